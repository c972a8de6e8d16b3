"""What the agent's task path records for Prometheus, and whether anything serves it.

An endpoint whose config names no ``metrics_port`` gets :class:`AgentMetrics` itself, which
records nothing and costs nothing; prometheus_client loads only on an endpoint that serves
metrics (:mod:`gc_agent.metrics_server`), as Parsl loads only on an htex endpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gc_agent.config import EndpointConfig
from gc_core.broker import BrokerSession
from gc_core.errors import ConfigError
from gc_core.extras import missing_extra
from gc_core.protocol import Heartbeat, ResultMessage

__all__ = ["AgentMetrics", "Readings", "serve"]


class AgentMetrics:
    """What the agent records as it happens; this base records nothing (metrics are off)."""

    def observe_result(self, result: ResultMessage) -> None:
        """Record how long a task whose result the broker confirmed waited and ran."""

    def count_refusal(self, reason: str) -> None:
        """Count a task answered, or dropped, without running; ``reason`` is an error
        class's name."""

    def close(self) -> None:
        """Stop serving."""


@dataclass(frozen=True)
class Readings:
    """Where the metrics read the agent's state at each scrape."""

    #: The agent's status, as its next heartbeat would say it.
    status: Callable[[], Heartbeat]
    #: Tasks taken from the queue and not yet answered.
    in_flight: Callable[[], int]
    #: The agent's broker session, once it has one.
    broker: Callable[[], BrokerSession | None]


def serve(config: EndpointConfig, readings: Readings) -> AgentMetrics:
    """Serve the agent's metrics at ``/metrics`` if its config names a ``metrics_port``.

    Raises:
        ConfigError: prometheus_client is not installed, or the port cannot be bound.
    """
    if config.metrics_port is None:
        return AgentMetrics()
    problem = missing_extra("agent")
    if problem is not None:
        raise ConfigError(f"metrics_port {problem}")
    from gc_agent.metrics_server import ServedMetrics

    return ServedMetrics.start(config, readings)
