"""Memory on long sweeps: ``python -m bench.memory --help`` (run from the repo root).

RSS (``VmRSS`` from ``/proc/<pid>/status``) of the client, the agent and the registry is
sampled at 10 %, 50 % and 100 % of each scenario; the 10 % sample is the warm-up baseline
and growth = (RSS at 100 % - RSS at 10 %) / RSS at 10 %.

Each scenario runs in a fresh client process (a one-worker spawn pool) against a fresh
stack from :class:`bench.gc_fabric.GcFabricSystem` (own vhost, registry, agent), so the
client's figures hold that scenario's sweep and nothing left over from the one before.
``--scale`` shrinks the sweeps and the in-flight windows alike, so a small run keeps the
same in-flight fraction as the full one. A FAIL is a figure, not an exit code.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import multiprocessing
import os
import shlex
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from bench.gc_fabric import GcFabricSystem
from bench.harness import TASK_TIMEOUT_S, background_cpu_busy, replace_section, throughput_timeout

logger = logging.getLogger(__name__)

#: Fractions of a sweep at which RSS is sampled; the first is the warm-up baseline.
MILESTONES = (0.1, 0.5, 1.0)
#: Growth after warm-up (a fraction of the baseline) below which a process passes.
GROWTH_LIMIT = 0.10
#: Processes sampled, in table order.
PROCESSES = ("client", "agent", "registry")
#: Heading of this module's section in RESULTS.md; the section runs to the next "## ".
HEADING = "## Memory on long sweeps"
#: Smallest in-flight window a scaled-down run uses.
MIN_WINDOW = 10
#: Scenarios whose in-flight tasks are bounded by ``--window``.
WINDOWED = ("map", "submit")
#: Seconds between looks at the task queue while the backlog scenario fills it.
QUEUE_POLL_S = 1.0


def noop(*_args: object) -> None:
    """The task: nothing at all (takes map's item and ignores it)."""


# -- pure: plans, growth, rendering ---------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """One scenario as configured: its key, title, size and in-flight window."""

    key: str
    title: str
    tasks: int
    window: int
    engine: str = "processes"


@dataclass(frozen=True)
class Outcome:
    """A scenario's RSS samples in MiB per process (one per milestone), or why there are none."""

    plan: Plan
    rss_mib: dict[str, tuple[float, ...]] = field(default_factory=dict)
    #: Seconds from the first submit (the agent's restart, for the backlog) to the last result.
    seconds: float | None = None
    skipped: str | None = None
    error: str | None = None


def scaled(size: int, scale: float, floor: int = 1) -> int:
    """Return ``size * scale`` rounded, at least ``floor``.

    >>> scaled(200_000, 0.01), scaled(10_000, 0.0001, floor=10)
    (2000, 10)
    """
    return max(floor, round(size * scale))


def milestone_counts(tasks: int) -> list[int]:
    """Return how many results must be in at each milestone."""
    return [max(1, round(fraction * tasks)) for fraction in MILESTONES]


def growth(samples: Sequence[float]) -> float:
    """Return growth after warm-up: (last - first) / first."""
    return (samples[-1] - samples[0]) / samples[0]


def verdict(samples: Sequence[float]) -> str:
    """Return PASS if growth after warm-up stays under GROWTH_LIMIT, else FAIL."""
    return "PASS" if growth(samples) < GROWTH_LIMIT else "FAIL"


def render_outcome(outcome: Outcome) -> str:
    """Render one scenario: a subheading, then its table or the reason it has none."""
    plan = outcome.plan
    window = f", window {plan.window:,}" if plan.key in WINDOWED else ""
    lines = [f"### {plan.title}: {plan.tasks:,} tasks{window}", ""]
    if outcome.skipped is not None or outcome.error is not None:
        why = f"skipped: {outcome.skipped}" if outcome.skipped else f"error: {outcome.error}"
        return "\n".join([*lines, why, ""])
    if outcome.seconds:
        rate = plan.tasks / outcome.seconds
        lines += [f"{plan.tasks:,} results in {outcome.seconds:.1f} s ({rate:,.0f}/s).", ""]
    lines += ["| process | RSS 10 % (MiB) | RSS 50 % (MiB) | RSS 100 % (MiB) | growth | verdict |",
              "|---|---:|---:|---:|---:|---|"]
    for name, samples in outcome.rss_mib.items():
        figures = " | ".join(f"{mib:.1f}" for mib in samples)
        lines.append(f"| {name} | {figures} | {growth(samples):+.1%} | {verdict(samples)} |")
    return "\n".join(lines) + "\n"


def render_section(outcomes: Sequence[Outcome], command: str, scale: float,
                   when: datetime.datetime, cpu_busy: str = "unknown") -> str:
    """Render the whole "Memory on long sweeps" section of RESULTS.md."""
    engines = ", ".join(sorted({o.plan.engine for o in outcomes}))
    head = (f"{HEADING}\n\nDate: {when.isoformat(timespec='seconds')}\n\nCommand: `{command}`\n\n"
            f"Scale: {scale:g} (agent engine: {engines}); CPU busy before the run (other "
            f"processes): {cpu_busy}\n\n"
            "VmRSS of the client (a fresh process per scenario), the agent's main process and "
            "the registry at 10 %, 50 % and 100 % of each sweep (of the drain, for the backlog). "
            "Growth = (RSS at 100 % − RSS at 10 %) / RSS at 10 %; the 10 % sample is the "
            f"warm-up baseline. Target: growth under {GROWTH_LIMIT:.0%}. Rates run from the "
            "first submit (from the agent's restart, for the backlog) to the last result.\n\n")
    return head + "\n".join(render_outcome(o) for o in outcomes)


# -- IO: RSS, sampling, the scenarios (these run in the client process) -----------------------

def rss_mib(pid: int) -> float:
    """Return the VmRSS of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


class Sampler:
    """Samples each process's RSS as the count of finished tasks crosses each milestone."""

    def __init__(self, pids: dict[str, int], tasks: int) -> None:
        self.pids = pids
        self.counts = milestone_counts(tasks)
        self.samples: dict[str, list[float]] = {name: [] for name in pids}
        self.started = time.perf_counter()
        #: Seconds from this sampler's creation to its last sample.
        self.seconds = 0.0

    def progress(self, done: int) -> None:
        """Record that ``done`` tasks have finished; sample at each milestone crossed."""
        while len(self.samples["client"]) < len(self.counts) \
                and done >= self.counts[len(self.samples["client"])]:
            for name, pid in self.pids.items():
                self.samples[name].append(rss_mib(pid))
            self.seconds = time.perf_counter() - self.started

    def rss(self) -> dict[str, tuple[float, ...]]:
        """Return the samples, in PROCESSES order."""
        return {name: tuple(self.samples[name]) for name in PROCESSES}


def _sampler(system: GcFabricSystem, tasks: int) -> Sampler:
    return Sampler({"client": os.getpid(), **system.pids()}, tasks)


def _bar(plan: Plan, what: str) -> tqdm[Any]:
    return tqdm(total=plan.tasks, desc=f"{plan.key}: {what}", unit="task", mininterval=1.0)


def run_map(system: GcFabricSystem, plan: Plan) -> Sampler:
    """``Executor.map`` with ``buffersize``, consuming each result as it comes."""
    sampler = _sampler(system, plan.tasks)
    with _bar(plan, "results") as bar:
        for done, _ in enumerate(system.executor.map(noop, range(plan.tasks),
                                                     buffersize=plan.window), 1):
            sampler.progress(done)
            bar.update()
    return sampler


def run_submit(system: GcFabricSystem, plan: Plan) -> Sampler:
    """``submit`` with a bounded window: at ``window`` outstanding, wait for the oldest."""
    sampler = _sampler(system, plan.tasks)
    outstanding: deque[Future[Any]] = deque()
    done = 0
    with _bar(plan, "results") as bar:
        for index in range(plan.tasks):
            outstanding.append(system.executor.submit(noop))
            while outstanding and (len(outstanding) >= plan.window or index == plan.tasks - 1):
                outstanding.popleft().result(timeout=TASK_TIMEOUT_S)
                done += 1
                sampler.progress(done)
                bar.update()
    return sampler


def run_backlog(system: GcFabricSystem, plan: Plan) -> Sampler:
    """Queue every task with the agent stopped, then start it and sample during the drain."""
    system.stop_agent()
    with _bar(plan, "submitted") as bar:
        futures = []
        for _ in range(plan.tasks):
            futures.append(system.executor.submit(noop))
            bar.update()
    deadline = time.monotonic() + throughput_timeout(plan.tasks)
    while unconfirmed := system.unconfirmed_tasks():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the broker has not taken {unconfirmed} of {plan.tasks} tasks")
        time.sleep(QUEUE_POLL_S)
    system.start_agent()
    sampler = _sampler(system, plan.tasks)
    with _bar(plan, "drained") as bar:
        for done, future in enumerate(as_completed(futures, timeout=throughput_timeout(plan.tasks)), 1):
            future.result()
            sampler.progress(done)
            bar.update()
    return sampler


#: Each scenario's key, title, default size and runner, in run order.
SCENARIOS: dict[str, tuple[str, int, Callable[[GcFabricSystem, Plan], Sampler]]] = {
    "map": ("1. Executor.map with buffersize", 1_000_000, run_map),
    "submit": ("2. submit with a bounded window", 200_000, run_submit),
    "backlog": ("3. backlog drained by a restarted agent", 100_000, run_backlog),
}


def run_plan(plan: Plan) -> Outcome:
    """Bring up a stack, run one scenario in this (client) process, and always stop the stack."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    system = GcFabricSystem(engine=plan.engine)
    try:
        system.start()
        sampler = SCENARIOS[plan.key][2](system, plan)
        return Outcome(plan, rss_mib=sampler.rss(), seconds=sampler.seconds)
    except Exception as exc:  # a failing scenario becomes a line, not a crashed run
        logger.exception("%s: failed", plan.key)
        return Outcome(plan, error=f"{type(exc).__name__}: {exc}")
    finally:
        system.stop()


def map_has_buffersize() -> bool:
    """Whether ``gc_client.Executor.map`` takes ``buffersize`` (Python 3.14 semantics)."""
    from gc_client import Executor

    return "buffersize" in inspect.signature(Executor.map).parameters


def run_in_fresh_process(plan: Plan) -> Outcome:
    """Run ``plan`` in a new spawned process, so the client's RSS is that scenario's alone."""
    if plan.key == "map" and not map_has_buffersize():
        return Outcome(plan, skipped="gc_client.Executor.map has no buffersize parameter yet")
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_plan, plan).result()


# -- command line ------------------------------------------------------------------------------

@click.command()
@click.option("--map-tasks", default=SCENARIOS["map"][1], show_default=True,
              help="Tasks in scenario 1 (Executor.map with buffersize).")
@click.option("--submit-tasks", default=SCENARIOS["submit"][1], show_default=True,
              help="Tasks in scenario 2 (submit with a bounded window).")
@click.option("--backlog-tasks", default=SCENARIOS["backlog"][1], show_default=True,
              help="Tasks in scenario 3 (queued while the agent is stopped).")
@click.option("--window", default=10_000, show_default=True,
              help="map's buffersize and submit's outstanding futures (scaled too).")
@click.option("--scale", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Multiply every size and window by this (0.01 runs in about two minutes).")
@click.option("--engine", default="processes", show_default=True,
              type=click.Choice(["processes", "threads"]), help="The agent's engine.")
@click.option("--scenarios", default=",".join(SCENARIOS), show_default=True,
              help="Comma list of scenarios to run.")
@click.option("--output", default="bench/RESULTS.md", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Markdown file to update.")
def main(map_tasks: int, submit_tasks: int, backlog_tasks: int, window: int, scale: float,
         engine: str, scenarios: str, output: Path) -> None:
    """Sample client, agent and registry RSS through long sweeps; update RESULTS.md."""
    sizes = {"map": map_tasks, "submit": submit_tasks, "backlog": backlog_tasks}
    keys = [key.strip() for key in scenarios.split(",") if key.strip()]
    if unknown := set(keys) - set(SCENARIOS):
        raise click.BadParameter(f"unknown: {', '.join(sorted(unknown))}", param_hint="--scenarios")
    plans = [Plan(key, SCENARIOS[key][0], scaled(sizes[key], scale),
                  scaled(window, scale, MIN_WINDOW), engine) for key in keys]
    cpu_busy = background_cpu_busy()
    outcomes = []
    for plan in plans:
        outcome = run_in_fresh_process(plan)
        click.echo(render_outcome(outcome))
        outcomes.append(outcome)
    command = shlex.join(["python", "-m", "bench.memory", *sys.argv[1:]])
    section = render_section(outcomes, command, scale, datetime.datetime.now().astimezone(),
                             cpu_busy)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(replace_section(output.read_text() if output.exists() else "", section, HEADING))
    click.echo(f"wrote the section {HEADING[3:]!r} of {output}")


if __name__ == "__main__":
    main()
