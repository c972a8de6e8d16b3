"""The agent's metrics from plain data: what a scrape shows for a given status, and which
label values a refusal or a result may add."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from gc_agent.metrics import Readings
from gc_agent.metrics_server import AgentCollector, ServedMetrics
from gc_core.protocol import Heartbeat, ResultMessage, Timings

ENDPOINT = "ep-1"


def heartbeat(**changes: object) -> Heartbeat:
    fields: dict[str, object] = {
        "endpoint_id": ENDPOINT, "hostname": "node-1", "pid": 42, "sent": 100.0, "period": 10.0,
        "started": 50.0, "engine": "processes", "workers": 4, "workers_busy": 1,
        "tasks_received": 7, "tasks_succeeded": 5, "tasks_failed": 1, "tasks_cancelled": 0}
    return Heartbeat.model_validate({**fields, **changes})


def scraped(status: Heartbeat) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(AgentCollector(ENDPOINT, Readings(lambda: status, lambda: 1, lambda: None)))
    return registry


def result(timings: Timings) -> ResultMessage:
    return ResultMessage(task_id="t-1", task_group_id="g-1", user="alice", state="success",
                         content_type="application/json", timings=timings)


def test_a_local_pool_shows_its_slots_as_busy_and_idle_workers_and_no_blocks() -> None:
    registry = scraped(heartbeat())

    assert registry.get_sample_value("gc_workers", {"endpoint": ENDPOINT, "state": "busy"}) == 1
    assert registry.get_sample_value("gc_workers", {"endpoint": ENDPOINT, "state": "idle"}) == 3
    assert registry.get_sample_value("gc_tasks_total",
                                     {"endpoint": ENDPOINT, "state": "success"}) == 5
    assert registry.get_sample_value("gc_broker_connected", {"endpoint": ENDPOINT}) == 0
    assert b"gc_htex_blocks{" not in generate_latest(registry)
    # no heartbeat has measured the queue yet: no sample rather than a made-up 0
    assert registry.get_sample_value("gc_endpoint_queue_depth", {"endpoint": ENDPOINT}) is None


def test_the_htex_engine_shows_its_connected_workers_and_blocks_in_every_state() -> None:
    registry = scraped(heartbeat(engine="htex", engine_status={
        "provider": "slurm", "blocks_pending": 1, "blocks_running": 2, "blocks_failed": 1,
        "workers": 8, "workers_busy": 6, "workers_idle": 2}))

    def blocks(state: str) -> float | None:
        return registry.get_sample_value("gc_htex_blocks", {"endpoint": ENDPOINT, "state": state})

    assert (blocks("pending"), blocks("running"), blocks("failed")) == (1, 2, 1)
    assert registry.get_sample_value("gc_workers", {"endpoint": ENDPOINT, "state": "busy"}) == 6
    assert registry.get_sample_value("gc_workers", {"endpoint": ENDPOINT, "state": "idle"}) == 2


def test_a_refusal_reason_that_is_not_a_class_name_counts_as_other() -> None:
    registry = CollectorRegistry()
    metrics = ServedMetrics(ENDPOINT, registry)

    metrics.count_refusal("PolicyError")
    metrics.count_refusal("task 3f0c… said: drop table")

    assert registry.get_sample_value("gc_task_refusals_total",
                                     {"endpoint": ENDPOINT, "reason": "PolicyError"}) == 1
    assert registry.get_sample_value("gc_task_refusals_total",
                                     {"endpoint": ENDPOINT, "reason": "other"}) == 1


def test_only_a_task_that_started_is_timed() -> None:
    registry = CollectorRegistry()
    metrics = ServedMetrics(ENDPOINT, registry)

    metrics.observe_result(result(Timings(received=10.0)))  # refused: never started
    metrics.observe_result(result(Timings(received=10.0, started=10.5, finished=12.5)))

    labels = {"endpoint": ENDPOINT}
    assert registry.get_sample_value("gc_task_run_seconds_count", labels) == 1
    assert registry.get_sample_value("gc_task_run_seconds_sum", labels) == 2.0
    assert registry.get_sample_value("gc_task_queue_wait_seconds_sum", labels) == 0.5
