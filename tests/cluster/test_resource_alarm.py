"""A broker that runs low on memory or disk stops taking messages (a resource alarm) until
its operator frees some. Nothing is lost meanwhile, but nothing moves either: whoever
publishes is told why, once, and again when it moves on.

The alarm is raised on one node of the session's private cluster (the shared broker's
configuration is never touched); RabbitMQ blocks publishers on every node.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from gc_client import Client, Executor
from tests.cluster.conftest import Cluster, ClusterFabric
from tests.fabric import eventually

#: What the alarm's notice says, in the client's log and the agent's.
BLOCKED = "stopped taking messages"
UNBLOCKED = "takes messages again"


def triple(x: int) -> int:
    return 3 * x


@contextmanager
def memory_alarm(cluster: Cluster) -> Iterator[None]:
    """A memory watermark no node can stay under, raised on node 1 and lowered after."""
    cluster.ctl(1, "set_vm_memory_high_watermark", "absolute", "1")
    try:
        yield
    finally:
        cluster.ctl(1, "set_vm_memory_high_watermark", "0.4")


def test_a_broker_out_of_memory_is_named_by_client_and_agent_and_the_tasks_wait_for_it(
        cluster_fabric: ClusterFabric, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    fabric = cluster_fabric.fabric
    caplog.set_level(logging.INFO, logger="gc_core.broker")
    with Client(broker_url=fabric.broker_url, registry_url=fabric.registry_url,
                home=str(fabric.home)) as client:
        ex = Executor(endpoint_id=cluster_fabric.endpoint.endpoint_id, client=client,
                      confirm_timeout=3)
        assert ex.submit(triple, 1).result(timeout=60) == 3  # connected, and publishing
        with memory_alarm(cluster_fabric.cluster):
            futures = [ex.submit(triple, x) for x in range(20)]
            eventually(lambda: BLOCKED in caplog.text, 60,
                       "the client to say the broker blocked it")
            notice = next(r.getMessage() for r in caplog.records if BLOCKED in r.getMessage())
            assert "memory" in notice and "wait" in notice, notice
            eventually(lambda: BLOCKED in cluster_fabric.endpoint.read_logs(), 60,
                       "the agent to say so in its log")
            eventually(lambda: "takes no messages (low on memory)" in fabric.cli(
                "gc-agent", "status", cluster_fabric.endpoint.name).stdout, 30,
                "gc-agent status to say so")
            # Shut down meanwhile, the Executor says why its tasks are not confirmed
            ex.shutdown(wait=False)
            told = capsys.readouterr().err
            assert "did not confirm 20 tasks" in told and "low on memory" in told, told
        # and once the alarm clears they run, every one
        assert [f.result(timeout=120) for f in futures] == [3 * x for x in range(20)]
        eventually(lambda: UNBLOCKED in caplog.text, 30, "the client to say it moves on")
