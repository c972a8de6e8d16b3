"""Where a lone call's time goes: ``python -m bench.legs`` (a section of bench/RESULTS.md).

Two measurements, one after the other on a quiet machine:

- One hop through the broker: a persistent message published through gc-fabric's
  ``BrokerSession`` until another session's consumer has it, on a classic durable queue
  (what the raw-AMQP and Dramatiq peers use) and on a quorum queue (what every gc-fabric
  queue is). A quorum queue hands a message to its consumer only once it is written to the
  broker's log on disk; a classic queue hands it over at once.
- A lone call, leg by leg: one no-op task at a time through the whole stack (as
  ``bench.run``'s latency runs), split by the times the agent stamps on the result and the
  ledger keeps (received, started, finished) and the client's own clock on each side.
  Every process runs on this machine, so one clock serves all. On the htex engine the
  legs to and from the worker include Parsl's way each way: the interchange and the
  pool's manager.
"""

from __future__ import annotations

import datetime
import queue
import shlex
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from bench.gc_fabric import GcFabricSystem, noop
from bench.harness import TASK_TIMEOUT_S, background_cpu_busy, nearest_rank, replace_section
from bench.peers._amqp import create_vhost, delete_vhost, vhost_url

HEADING = "## Where the time goes (issue 14)"
#: Samples dropped at the start of each measurement (connections and caches warming up).
WARMUP = 30
#: Seconds between two samples, so each meets an idle stack as a lone call does.
PAUSE_S = 0.002
#: Task ids asked of the ledger per call.
LEDGER_CHUNK = 100
#: Seconds the ledger gets to record the last results before it is asked for them.
LEDGER_SETTLE_S = 1.0
#: The legs of a lone call, in order, as (name, what it covers).
LEGS = (
    ("client → agent", ("submit() called → the agent has the task (two processes, one "
                       "broker hop)")),
    ("agent → worker", "the agent has it → the function starts"),
    ("run", "the no-op function"),
    ("worker → caller", "the function ended → result() returns (one broker hop)"),
    ("total", "submit() → result()"),
)


@dataclass(frozen=True)
class Hop:
    queue_type: str
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Legs:
    engine: str
    samples: int
    #: p50 of each of LEGS, in milliseconds.
    p50_ms: tuple[float, ...]


def broker_hop(queue_type: str, samples: int) -> Hop:
    """Publish ``samples`` persistent messages one at a time and time each to its consumer."""
    from gc_core.broker import BrokerSession
    from gc_core.broker_consumers import Delivery
    from gc_core.protocol import Envelope
    from gc_core.topology import QueueDeclaration, load_topology

    vhost = create_vhost("hop")
    url, topology = vhost_url(vhost), load_topology()
    declaration = QueueDeclaration(name=f"hop.{queue_type}",
                                   arguments={"x-queue-type": queue_type}, bindings=())
    arrivals: queue.Queue[float] = queue.Queue()
    consumer = BrokerSession(url, name="bench-hop-consumer", topology=topology,
                             queues=[declaration], prefetch=100)
    publisher = BrokerSession(url, name="bench-hop-publisher", topology=topology)
    try:
        def arrived(delivery: Delivery) -> None:
            arrivals.put(time.perf_counter())
            consumer.ack(delivery)

        consumer.consume(declaration.name, arrived)
        consumer.start()
        publisher.start()
        times = []
        for _ in range(samples + WARMUP):
            start = time.perf_counter()
            publisher.publish("", declaration.name, Envelope(str(uuid.uuid4()), "", "text/plain",
                                                             {}, b"x" * 200))
            times.append(arrivals.get(timeout=TASK_TIMEOUT_S) - start)
            time.sleep(PAUSE_S)
    finally:
        publisher.close()
        consumer.close()
        delete_vhost(vhost)
    kept = times[WARMUP:]
    return Hop(queue_type, 1000 * nearest_rank(kept, 50), 1000 * nearest_rank(kept, 99))


def lone_call_legs(engine: str, samples: int) -> Legs:
    """Run ``samples`` lone no-op calls on ``engine`` and split each into LEGS."""
    system = GcFabricSystem(engine)
    system.start()
    try:
        executor = system.executor
        executor.submit(noop).result(timeout=TASK_TIMEOUT_S)
        calls: list[tuple[str, float, float]] = []
        for _ in range(samples + WARMUP):
            start = time.time()
            future = executor.submit(noop)
            future.result(timeout=TASK_TIMEOUT_S)
            calls.append((future.task_id, start, time.time()))
            time.sleep(PAUSE_S)
        calls = calls[WARMUP:]
        time.sleep(LEDGER_SETTLE_S)
        ids = [task_id for task_id, _, _ in calls]
        recorded = {task.task_id: task.timings
                    for start in range(0, len(ids), LEDGER_CHUNK)
                    for task in executor.client.registry.get_tasks(ids[start:start + LEDGER_CHUNK])}
    finally:
        system.stop()
    split = []
    for task_id, submitted, returned in calls:
        t = recorded[task_id]
        if t is None or None in (t.received, t.started, t.finished):
            raise RuntimeError(f"the ledger has no timings for task {task_id}")
        assert t.received is not None and t.started is not None and t.finished is not None
        split.append((t.received - submitted, t.started - t.received, t.finished - t.started,
                      returned - t.finished, returned - submitted))
    return Legs(engine, len(split), tuple(1000 * nearest_rank([s[i] for s in split], 50)
                                          for i in range(len(LEGS))))


def render_section(hops: Sequence[Hop], legs: Sequence[Legs], command: str,
                   when: datetime.datetime, cpu_busy: str) -> str:
    lines = [HEADING, "", f"Date: {when.isoformat(timespec='seconds')}", "",
             f"Command: `{command}`", "", f"CPU busy before the run (other processes): {cpu_busy}",
             "", __doc__.split("\n\n", 1)[1].strip(), "",
             "### One hop through the broker", "",
             "| queue | p50 ms | p99 ms |", "|---|---:|---:|"]
    lines += [f"| {hop.queue_type} | {hop.p50_ms:.3f} | {hop.p99_ms:.3f} |" for hop in hops]
    lines += ["", "### A lone call, leg by leg (p50 of each leg, ms)", "",
              "| leg | what it covers | " + " | ".join(leg.engine for leg in legs) + " |",
              "|---|---|" + "---:|" * len(legs)]
    lines += [f"| {name} | {covers} | " + " | ".join(f"{leg.p50_ms[i]:.3f}" for leg in legs) + " |"
              for i, (name, covers) in enumerate(LEGS)]
    lines += ["", (f"Samples: {', '.join(f'{leg.samples} ({leg.engine})' for leg in legs)}; the "
              "legs' p50s need not add up to the total's."), ""]
    return "\n".join(lines)


@click.command()
@click.option("--samples", default=300, show_default=True, help="Round trips per measurement.")
@click.option("--engines", default="threads,processes,htex", show_default=True,
              help="Comma list of the agent's engines to split a lone call on.")
@click.option("--output", default="bench/RESULTS.md", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Markdown file to update.")
def main(samples: int, engines: str, output: Path) -> None:
    """Time one broker hop (classic, quorum) and a lone call's legs; update RESULTS.md."""
    cpu_busy = background_cpu_busy()
    hops = [broker_hop(kind, samples) for kind in ("classic", "quorum")]
    legs = [lone_call_legs(engine.strip(), samples) for engine in engines.split(",") if engine.strip()]
    section = render_section(hops, legs, shlex.join(["python", "-m", "bench.legs", *sys.argv[1:]]),
                             datetime.datetime.now().astimezone(), cpu_busy)
    click.echo(section)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(replace_section(output.read_text() if output.exists() else "", section, HEADING))
    click.echo(f"wrote the section {HEADING[3:]!r} of {output}")


if __name__ == "__main__":
    main()
