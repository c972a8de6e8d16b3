"""The agent's Prometheus metrics and the listener that serves them at ``/metrics``.

What the agent counts anyway — tasks by state, workers, htex blocks, queue depth, tasks in
flight, broker reconnects — is read from it at each scrape (:class:`AgentCollector`), so
the task path pays nothing for it; only what the agent keeps nowhere else is recorded as it
happens (:class:`ServedMetrics`): the run-time and queue-wait histograms and refusals by
reason. Every label value is bounded: the endpoint's id, a state, the class name of an
error of our own code; never a task id or a user's text.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gc_agent.config import EndpointConfig
from gc_agent.metrics import AgentMetrics, Readings
from gc_core.errors import ConfigError
from gc_core.protocol import Heartbeat, ResultMessage

__all__ = ["AgentCollector", "ServedMetrics"]

#: Seconds, from a trivial function's few milliseconds to a long simulation's hours.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 900.0, 3600.0, 14_400.0)
#: What a refusal's reason may look like: an error class's name. Anything else (our code
#: sends no such value) counts as "other", so no text can mint a series of its own.
_REASON = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
#: Prefix of the htex engine's status keys that count its blocks in one state each.
_BLOCKS_PREFIX = "blocks_"


class ServedMetrics(AgentMetrics):
    """One agent's metrics, in a registry of its own, served by prometheus_client's HTTP
    server in a thread."""

    def __init__(self, endpoint_id: str, registry: CollectorRegistry) -> None:
        self._endpoint_id = endpoint_id
        self._run_seconds = Histogram(
            "gc_task_run_seconds", "Seconds a task ran on its worker, from start to finish.",
            ["endpoint"], buckets=DURATION_BUCKETS, registry=registry)
        self._queue_wait_seconds = Histogram(
            "gc_task_queue_wait_seconds",
            "Seconds a task waited at the agent, from its delivery to its start on a worker.",
            ["endpoint"], buckets=DURATION_BUCKETS, registry=registry)
        self._refusals = Counter(
            "gc_task_refusals",
            "Tasks answered, or dropped, without running, by reason: the error class answered "
            "(PolicyError, SerializerNotAllowed, ...), ProtocolError for an undecodable task, "
            "ForgedSender for one dropped for naming another sender.",
            ["endpoint", "reason"], registry=registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, config: EndpointConfig, readings: Readings) -> ServedMetrics:
        """Register the agent's metrics and serve them on the config's metrics port.

        Raises:
            ConfigError: the address or port cannot be bound (in use, say).
        """
        assert config.metrics_port is not None
        registry = CollectorRegistry()
        served = cls(config.endpoint_id, registry)
        for collector in (AgentCollector(config.endpoint_id, readings), PROCESS_COLLECTOR,
                          PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)
        try:
            served._server, served._thread = start_http_server(
                config.metrics_port, config.metrics_address, registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {config.metrics_address}:"
                              f"{config.metrics_port}: {exc.strerror or exc}; set metrics_port "
                              f"in the endpoint's config.yaml to a free port, or remove it to "
                              f"serve none") from exc
        return served

    def observe_result(self, result: ResultMessage) -> None:
        timings = result.timings
        if timings.started is None:
            return  # answered without running: a refusal, or a cancel before it started
        if timings.received is not None:
            self._queue_wait_seconds.labels(self._endpoint_id).observe(
                max(0.0, timings.started - timings.received))
        if timings.finished is not None:
            self._run_seconds.labels(self._endpoint_id).observe(
                max(0.0, timings.finished - timings.started))

    def count_refusal(self, reason: str) -> None:
        self._refusals.labels(self._endpoint_id,
                              reason if _REASON.fullmatch(reason) else "other").inc()

    def close(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)


class AgentCollector(Collector):
    """The gauges and counters the agent keeps anyway, read when Prometheus scrapes."""

    def __init__(self, endpoint_id: str, readings: Readings) -> None:
        self._endpoint_id = endpoint_id
        self._readings = readings

    def collect(self) -> Iterator[Metric]:
        status = self._readings.status()
        info = InfoMetricFamily("gc_agent", "The agent: its engine and host.", labels=["endpoint"])
        info.add_metric([self._endpoint_id], {"engine": status.engine, "hostname": status.hostname})
        yield info
        yield self._one("gc_agent_start_time_seconds", "When the agent started, in epoch seconds.",
                        status.started)
        yield self._one("gc_tasks_received", "Task deliveries the agent took.",
                        status.tasks_received, counter=True)
        yield self._by_state("gc_tasks", "Tasks whose result the broker confirmed, by state.", {
            "success": status.tasks_succeeded, "failed": status.tasks_failed,
            "cancelled": status.tasks_cancelled}, counter=True)
        yield self._one("gc_tasks_in_flight", "Tasks taken from the queue and not yet answered.",
                        self._readings.in_flight())
        yield self._by_state("gc_workers", "Workers, by state: busy or idle.", _workers(status))
        yield self._by_state("gc_htex_blocks", "The htex engine's blocks, by state (none for "
                                               "other engines).", _blocks(status))
        yield self._one("gc_endpoint_queue_depth",
                        "Tasks ready in the endpoint's queue at the last heartbeat.",
                        status.queue_depth)
        broker = self._readings.broker()
        yield self._one("gc_broker_connected", "1 while the agent's broker session is ready.",
                        int(broker is not None and broker.connected))
        yield self._one("gc_broker_reconnects", "Times the agent's broker session was ready again "
                                                "after losing its connection.",
                        broker.reconnects if broker is not None else 0, counter=True)

    def _one(self, name: str, documentation: str, value: float | None, *,
             counter: bool = False) -> Metric:
        """A gauge (or counter) with the endpoint's one sample; none while ``value`` is None."""
        family = (CounterMetricFamily if counter else GaugeMetricFamily)(
            name, documentation, labels=["endpoint"])
        if value is not None:
            family.add_metric([self._endpoint_id], value)
        return family

    def _by_state(self, name: str, documentation: str, values: dict[str, int], *,
                  counter: bool = False) -> Metric:
        """A gauge (or counter) with one sample per state."""
        family = (CounterMetricFamily if counter else GaugeMetricFamily)(
            name, documentation, labels=["endpoint", "state"])
        for state, value in values.items():
            family.add_metric([self._endpoint_id, state], value)
        return family


def _workers(status: Heartbeat) -> dict[str, int]:
    """Busy and idle workers: the htex engine's connected ones, else the pool's slots."""
    engine = status.engine_status
    if "workers_busy" in engine:
        return {"busy": int(engine["workers_busy"]), "idle": int(engine.get("workers_idle", 0))}
    return {"busy": status.workers_busy, "idle": max(0, status.workers - status.workers_busy)}


def _blocks(status: Heartbeat) -> dict[str, int]:
    """The htex engine's blocks by state, from its status keys ``blocks_<state>``."""
    return {key[len(_BLOCKS_PREFIX):]: int(count)
            for key, count in sorted(status.engine_status.items())
            if key.startswith(_BLOCKS_PREFIX)}
