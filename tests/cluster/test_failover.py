"""A broker node dies mid-sweep and nothing is lost.

A 3-node cluster of private nodes (``deploy/rabbitmq/start-cluster.sh``); the client, the
agent and the registry's ledger each get the nodes' URLs in their own order, so each is
connected to a node of its own (client 1, agent 2, registry 3) and a fault can hit one of
them alone. A steady sweep of 5,000 tasks is running when the fault comes; afterwards every
future has resolved with its own value and the ledger holds exactly 5,000 successes.

The longest stall of results after the fault began (the last result before it to the
first after) is printed (run with ``-s``) and written in the README's cluster section.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

from gc_client import AsyncExecutor, Client, ComputeFuture, Executor
from tests.cluster.conftest import ClusterFabric
from tests.fabric import eventually

TASKS = 5_000
#: Results in before the fault: it meets the sweep in full flow, thousands of tasks queued,
#: running or on their way back.
BEFORE_FAULT = 1_000


def double(x: int) -> int:
    return 2 * x


@dataclass
class Sweep:
    """What a sweep saw: each result's arrival time, and when the fault began and ended."""

    arrivals: list[float] = field(default_factory=list)
    fault_began: float = 0.0
    fault_ended: float = 0.0

    @property
    def recovery(self) -> float:
        """The longest wait for a result from the fault's start on: the last result before
        a stall to the first after it."""
        times = sorted(self.arrivals)
        return max(later - earlier for earlier, later in pairwise(times)
                   if later > self.fault_began)


def run_sweep(setup: ClusterFabric, fault: Callable[[], None], *,
              submit_rate: float | None = None) -> Sweep:
    """Submit TASKS tasks (at once, or ``submit_rate`` a second so that the submitting goes
    on through a long fault); call ``fault`` once BEFORE_FAULT results are in; check every
    result and the ledger."""
    sweep = Sweep()
    lock = threading.Lock()

    def arrived(_future: object) -> None:
        with lock:
            sweep.arrivals.append(time.monotonic())
            if len(sweep.arrivals) == BEFORE_FAULT:
                threading.Thread(target=inject, daemon=True).start()

    futures: list[ComputeFuture] = []
    faulted = threading.Event()

    def inject() -> None:
        sweep.fault_began = time.monotonic()
        fault()
        sweep.fault_ended = time.monotonic()
        faulted.set()

    fabric = setup.fabric
    with Client(broker_url=fabric.broker_url, registry_url=fabric.registry_url,
                home=str(fabric.home)) as client, \
            Executor(setup.endpoint.endpoint_id, client=client) as executor:
        started = time.monotonic()
        for i in range(TASKS):
            future = executor.submit(double, i)
            future.add_done_callback(arrived)
            futures.append(future)
            if submit_rate is not None:
                time.sleep(max(0.0, started + (i + 1) / submit_rate - time.monotonic()))
        assert faulted.wait(300), "the fault did not end"
        values = [future.result(timeout=300) for future in futures]

    assert values == [double(i) for i in range(TASKS)]
    assert len(sweep.arrivals) == TASKS  # each future resolved once
    eventually(lambda: setup.ledger_counts() == {"success": TASKS}, timeout=120,
               what=f"the ledger to hold exactly {TASKS} successes (it holds "
                    f"{setup.ledger_counts()})")
    print(f"\nrecovery: results stalled for at most {sweep.recovery:.2f} s after the fault "
          f"began; the fault took {sweep.fault_ended - sweep.fault_began:.1f} s")
    return sweep


def _task_queue_leader(setup: ClusterFabric) -> int:
    queue = f"gc.ep.{setup.endpoint.endpoint_id}.tasks"
    leader = setup.cluster.leader_of(queue, setup.fabric.vhost)
    assert leader is not None, f"{queue} has no leader"
    return leader


def test_kill_9_of_each_node_in_turn_mid_sweep_loses_no_task(cluster_fabric: ClusterFabric) -> None:
    # One sweep meets three faults: node 1 (the client's), node 2 (the agent's) and node 3
    # (the registry's) each killed with SIGKILL, the first two brought back before the next
    # kill so that a majority stays up. A leader moves only when its node dies, so one of
    # the three kills is bound to hit the node then leading the endpoint's task queue.
    cluster = cluster_fabric.cluster
    vhost = cluster_fabric.fabric.vhost
    agent_connection = f"gc-agent:{cluster_fabric.endpoint.endpoint_id}"
    assert cluster.node_of_connection(agent_connection, vhost) == 2
    leaders_killed: list[bool] = []

    def kill_each_in_turn() -> None:
        for k in range(1, cluster.nodes + 1):
            leaders_killed.append(_task_queue_leader(cluster_fabric) == k)
            cluster.kill(k)
            if k < cluster.nodes:
                cluster.restart(k)

    run_sweep(cluster_fabric, kill_each_in_turn, submit_rate=125)  # ~40 s: the faults' time

    assert cluster.nodes not in cluster.up()
    assert any(leaders_killed), "no kill hit the task queue's leader"


def test_a_rolling_restart_of_every_node_loses_no_task(cluster_fabric: ClusterFabric) -> None:
    cluster = cluster_fabric.cluster

    def rolling_restart() -> None:
        for k in range(1, cluster.nodes + 1):
            cluster.stop_node(k)
            cluster.restart(k)

    run_sweep(cluster_fabric, rolling_restart, submit_rate=125)  # ~40 s: the restarts' time


def test_clients_and_agents_on_the_majority_go_on_while_a_node_is_paused(
        cluster_fabric: ClusterFabric) -> None:
    # Node 3 is cut off (its VM stopped: it answers nobody, as behind a partition); the
    # client (node 1) and the agent (node 2) are on the majority. The registry's ledger is on
    # node 3: it is cut off too, and catches up once it has moved or node 3 is back.
    cluster = cluster_fabric.cluster

    def partition() -> None:
        cluster.pause(3)
        time.sleep(15)  # the sweep runs on the majority meanwhile
        cluster.resume(3)

    sweep = run_sweep(cluster_fabric, partition, submit_rate=250)

    paused = [t for t in sweep.arrivals if sweep.fault_began < t < sweep.fault_ended]
    assert len(paused) >= 500, f"only {len(paused)} results arrived while node 3 was paused"



def test_an_async_executor_fails_over_when_its_node_dies(cluster_fabric: ClusterFabric) -> None:
    # aio-pika reconnects to its one URL; the session's connection moves to the next node.
    cluster, fabric = cluster_fabric.cluster, cluster_fabric.fabric
    tasks, before_fault = 2_000, 200

    async def sweep() -> tuple[list[int], int | None]:
        with Client(broker_url=fabric.broker_url, registry_url=fabric.registry_url,
                    home=str(fabric.home)) as client:
            async with AsyncExecutor(cluster_fabric.endpoint.endpoint_id, client=client) as ex:
                futures = []
                for i in range(tasks):
                    if i == before_fault:
                        await asyncio.to_thread(cluster.kill, 1)  # the client's node
                    futures.append(await ex.submit(double, i))
                values = list(await asyncio.wait_for(asyncio.gather(*futures), 300))
                node = cluster.node_of_connection(f"gc-client:{client.settings.user}:"
                                                  f"{ex.task_group_id}", fabric.vhost)
                return values, node

    values, node = asyncio.run(sweep())

    assert values == [double(i) for i in range(tasks)]
    assert node == 2
    eventually(lambda: cluster_fabric.ledger_counts() == {"success": tasks}, timeout=120,
               what=f"the ledger to hold exactly {tasks} successes")
