"""Pure parts of the benchmark: the System protocol, percentiles, measurements and reporting.

Methodology (see /work/shared/ANCHORS.md): no-op tasks over loopback.

* Rounds: the run goes over every system ``rounds`` times, each time starting it, one
  sweep and its share of the round trips, and stopping it; a system's figures pool its
  rounds. Spread so over the whole run, every system meets the machine's slow and fast
  spells alike: these machines' own speed drifts by half within a run (a Python loop timed
  13 to 21 µs in one), and a system measured only while it lasted was compared with
  others measured outside it.
* Throughput: N tasks submitted as fast as the API allows; a sweep's rate is
  N / (first submit -> last result), and a system's the median of its sweeps.
* Latency: one task at a time, round trip, nearest-rank p50/p99 of every round's.
* CPU per task: CPU seconds every process of the system used over the throughput sweeps
  and until its processes go quiet after them (``bench.cpu``), by role, divided by their
  tasks.

Every system starts its own worker(s) as subprocess(es) in ``start()`` and stops them in
``stop()``; ``measure()`` warms each system up before it measures and always stops it.
"""

from __future__ import annotations

import abc
import datetime
import gc
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TypeVar

from bench import cpu

logger = logging.getLogger(__name__)

#: Name of the row every other row's ratios are taken against (raw AMQP, reliable mode).
BASELINE_SYSTEM = "raw-amqp-reliable"
#: Name of the second reference row (Celery, the incumbent most users compare against).
CELERY_SYSTEM = "celery-threads"
#: Tasks sent through each system before anything is measured.
WARMUP_TASKS = 200
#: Rounds over every system: each measures one sweep of each (a system's rate is the
#: median of its sweeps) and its share of the round trips.
ROUNDS = 3
#: Longest wait for any single result; bounds latency runs and the start of throughput runs.
TASK_TIMEOUT_S = 30.0
#: Slowest rate a throughput run may fall to before it is abandoned (tasks per second).
MIN_RATE_PER_S = 50.0
#: Seconds over which the machine's background CPU use is sampled before a run.
IDLE_SAMPLE_S = 3.0
#: Packages whose versions are listed in RESULTS.md.
REPORTED_PACKAGES = ("pika", "celery", "kombu", "parsl", "pyzmq", "dramatiq", "redis")


class System(abc.ABC):
    """A task system under test: start workers, run no-op tasks, stop workers."""

    #: Short unique name, used in ``--systems`` and as the table's row label.
    name: str
    #: Whether the system runs on the local RabbitMQ, whose broker's CPU then counts as its.
    uses_rabbitmq: bool = True

    @abc.abstractmethod
    def start(self) -> None:
        """Start the worker subprocess(es) and connect the client."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the workers, close the client and delete broker objects; safe to call twice."""

    @abc.abstractmethod
    def run_throughput(self, n: int) -> float:
        """Submit ``n`` no-op tasks as fast as possible; return seconds from first submit to last result."""

    @abc.abstractmethod
    def run_latency(self, n: int) -> list[float]:
        """Run ``n`` no-op tasks one at a time; return each round trip in seconds."""

    @abc.abstractmethod
    def processes(self) -> list[cpu.ProcessRoot]:
        """The processes started by ``start()``, by role; the client and broker are added."""


def throughput_timeout(n: int) -> float:
    """Return how long a throughput run of ``n`` tasks may take before it is abandoned."""
    return TASK_TIMEOUT_S + n / MIN_RATE_PER_S


Handle = TypeVar("Handle")


def time_sweep(n: int, submit: Callable[[], Handle], wait: Callable[[Handle, float], object]) -> float:
    """Submit ``n`` tasks, then wait for each (``wait(handle, seconds_left)``); return the
    seconds from the first submit to the last result."""
    deadline = time.monotonic() + throughput_timeout(n)
    started = time.perf_counter()
    handles = [submit() for _ in range(n)]
    for handle in handles:
        wait(handle, max(deadline - time.monotonic(), 0.1))
    return time.perf_counter() - started


def time_round_trips(n: int, call: Callable[[], object]) -> list[float]:
    """Make ``n`` calls one after another (each submits a task and waits for its result);
    return each call's seconds."""
    round_trips = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        round_trips.append(time.perf_counter() - started)
    return round_trips


def nearest_rank(samples: Sequence[float], pct: float) -> float:
    """Return the nearest-rank ``pct`` percentile (0 < pct <= 100) of ``samples``.

    Raises:
        ValueError: if ``samples`` is empty or ``pct`` is out of range.

    >>> nearest_rank([4.0, 1.0, 3.0, 2.0], 50)
    2.0
    """
    if not samples:
        raise ValueError("no samples")
    if not 0 < pct <= 100:
        raise ValueError(f"percentile {pct} not in (0, 100]")
    ordered = sorted(samples)
    rank = math.ceil(pct / 100 * len(ordered))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Measurement:
    """One system's figures, or the error that stopped it from producing them."""

    system: str
    #: The median of ``rates``.
    tasks_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    error: str | None = None
    #: CPU seconds per task over the throughput sweeps, by role (``bench.cpu.ROLES``).
    cpu_per_task_s: Mapping[str, float] = field(default_factory=dict)
    #: Each throughput sweep's tasks/s, in the order they ran.
    rates: tuple[float, ...] = ()


def summarize(system: str, n: int, elapsed_s: Sequence[float], round_trips_s: Sequence[float],
              cpu_s: Mapping[str, float] | None = None) -> Measurement:
    """Turn raw timings into a Measurement: the median rate of the sweeps of ``n`` tasks
    that took ``elapsed_s`` each, percentiles in ms, and CPU per task over all the sweeps."""
    rates = tuple(n / elapsed for elapsed in elapsed_s)
    return Measurement(
        system=system,
        tasks_per_s=statistics.median(rates),
        p50_ms=nearest_rank(round_trips_s, 50) * 1000,
        p99_ms=nearest_rank(round_trips_s, 99) * 1000,
        cpu_per_task_s={role: seconds / (n * len(rates)) for role, seconds in (cpu_s or {}).items()},
        rates=rates,
    )


def process_roots(system: System) -> list[cpu.ProcessRoot]:
    """Every process whose CPU counts as ``system``'s: its own, then the broker and the client."""
    return [*system.processes(), *(cpu.broker_roots() if system.uses_rabbitmq else []),
            *cpu.client_roots()]


@dataclass(frozen=True)
class Round:
    """What one round measured of a system: its sweeps' seconds, its round trips' seconds
    and the CPU seconds its processes used over the sweeps, by role."""

    elapsed_s: tuple[float, ...]
    round_trips_s: tuple[float, ...]
    cpu_s: Mapping[str, float]


def measure(system: System, tasks: int, latency_samples: int,
            warmup: int = WARMUP_TASKS) -> Round:
    """Start ``system``, warm it up, time one throughput sweep then ``latency_samples``
    round trips, and always stop it."""
    # What the systems before left alive stays out of the cyclic collector's walks, or each
    # system's client pays for their heap: gc-fabric's client CPU per task after the Celery,
    # Parsl and Dramatiq peers was 130 µs (threads) and 118 (processes), 92 and 82 frozen,
    # 92 and 99 alone. Thawed after: frozen objects are missing from gc.get_objects().
    gc.collect()
    gc.freeze()
    try:
        logger.info("%s: starting", system.name)
        system.start()
        system.run_throughput(warmup)
        roots = process_roots(system)
        before = cpu.snapshot(roots)
        elapsed = system.run_throughput(tasks)
        cpu_s = cpu.seconds_by_role(before, cpu.settled_snapshot(roots))
        logger.info("%s: a sweep of %d tasks, %.0f tasks/s; CPU %s", system.name, tasks,
                    tasks / elapsed, {role: round(s, 2) for role, s in cpu_s.items()})
        system.run_latency(min(warmup, 50))
        return Round((elapsed,), tuple(system.run_latency(latency_samples)), cpu_s)
    finally:
        try:
            system.stop()
        except Exception:
            logger.exception("%s: stop failed", system.name)
        gc.unfreeze()


def pooled(system: str, tasks: int, rounds: Sequence[Round]) -> Measurement:
    """A system's figures from all its rounds of sweeps of ``tasks`` tasks."""
    cpu_s: dict[str, float] = {}
    for one in rounds:
        for role, seconds in one.cpu_s.items():
            cpu_s[role] = cpu_s.get(role, 0.0) + seconds
    return summarize(system, tasks, [e for one in rounds for e in one.elapsed_s],
                     [t for one in rounds for t in one.round_trips_s], cpu_s)


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "–"
    return f"{value / reference:.2f}×"


def _number(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _spread(rates: Sequence[float]) -> str:
    """The lowest and highest of several sweeps' rates; a dash for one sweep or none."""
    return f"{min(rates):,.0f} – {max(rates):,.0f}" if len(rates) > 1 else "–"


def _find(measurements: Sequence[Measurement], name: str) -> Measurement | None:
    return next((m for m in measurements if m.system == name and m.error is None), None)


def render_table(
    measurements: Sequence[Measurement],
    baseline: str = BASELINE_SYSTEM,
    celery: str = CELERY_SYSTEM,
) -> str:
    """Render a Markdown table with throughput and p50 ratios against ``baseline`` and ``celery``."""
    base = _find(measurements, baseline) or Measurement(system=baseline)
    ref = _find(measurements, celery) or Measurement(system=celery)
    header = (
        f"| system | tasks/s | tasks/s, each round (low – high) | p50 ms | p99 ms "
        f"| tasks/s vs {baseline} | p50 vs {baseline} | tasks/s vs {celery} | p50 vs {celery} |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in measurements:
        if m.error is not None:
            error = m.error.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {m.system} | error: {error} | | | | | | | |")
            continue
        lines.append(
            f"| {m.system} | {_number(m.tasks_per_s, ',.0f')} | {_spread(m.rates)} "
            f"| {_number(m.p50_ms, '.2f')} "
            f"| {_number(m.p99_ms, '.2f')} "
            f"| {_ratio(m.tasks_per_s, base.tasks_per_s)} | {_ratio(m.p50_ms, base.p50_ms)} "
            f"| {_ratio(m.tasks_per_s, ref.tasks_per_s)} | {_ratio(m.p50_ms, ref.p50_ms)} |"
        )
    return "\n".join(lines) + "\n"


def render_pairs(measurements: Sequence[Measurement], pairs: Sequence[tuple[str, str]]) -> str:
    """Render a Markdown table comparing each (ours, theirs) pair of rows: the cost of our layer."""
    lines = [("| ours | theirs | tasks/s ours | tasks/s theirs | tasks/s ratio | p50 ms ours "
              "| p50 ms theirs | p50 ratio |"), "|---|---|---:|---:|---:|---:|---:|---:|"]
    for ours_name, theirs_name in pairs:
        ours = _find(measurements, ours_name) or Measurement(system=ours_name)
        theirs = _find(measurements, theirs_name) or Measurement(system=theirs_name)
        lines.append(
            f"| {ours_name} | {theirs_name} | {_number(ours.tasks_per_s, ',.0f')} "
            f"| {_number(theirs.tasks_per_s, ',.0f')} | {_ratio(ours.tasks_per_s, theirs.tasks_per_s)} "
            f"| {_number(ours.p50_ms, '.2f')} | {_number(theirs.p50_ms, '.2f')} "
            f"| {_ratio(ours.p50_ms, theirs.p50_ms)} |")
    return "\n".join(lines) + "\n"


def rabbitmq_version() -> str:
    """Return the broker version from ``rabbitmqctl version``, or ``"unknown"``."""
    try:
        done = subprocess.run(
            ["rabbitmqctl", "version"], capture_output=True, text=True, timeout=15, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _package_versions() -> str:
    versions = []
    for package in REPORTED_PACKAGES:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(versions)


def _cpu_ticks() -> tuple[int, int]:
    """Return (busy, total) CPU ticks since boot from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def background_cpu_busy(window_s: float = IDLE_SAMPLE_S) -> str:
    """Return how busy the whole machine's CPUs were over ``window_s``, before we load it."""
    try:
        busy_before, total_before = _cpu_ticks()
        time.sleep(window_s)
        busy_after, total_after = _cpu_ticks()
    except (OSError, ValueError, IndexError):
        return "unknown"
    total = total_after - total_before
    return f"{100 * (busy_after - busy_before) / total:.0f}%" if total else "unknown"


def machine_facts() -> dict[str, str]:
    """Collect the facts a reader needs to compare runs: cores, CPU, Python, broker, packages."""
    return {
        "nproc": str(os.cpu_count()),
        "CPU": _cpu_model(),
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "RabbitMQ": rabbitmq_version(),
        "packages": _package_versions(),
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    """Return the command line that produced this run, as ``python -m bench.run ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "-m", "bench.run", *args])


def render_results(
    measurements: Sequence[Measurement],
    facts: dict[str, str],
    command: str,
    when: datetime.datetime,
    settings: dict[str, int],
    pairs: Sequence[tuple[str, str]] = (),
) -> str:
    """Render the whole RESULTS.md: method, settings, machine facts, the table and the pairs."""
    settings_text = ", ".join(f"{key}={value}" for key, value in settings.items())
    facts_text = "\n".join(f"- {key}: {value}" for key, value in facts.items())
    return (
        "# gc-fabric benchmark results\n\n"
        f"Date: {when.isoformat(timespec='seconds')}\n\n"
        f"Command: `{command}`\n\n"
        f"Settings: {settings_text}\n\n"
        "No-op tasks over loopback; client, broker and workers share the machine. "
        "The run goes over every system `rounds` times (one sweep and a share of the round "
        "trips each time), so that the machine's drift meets all systems alike. "
        "Throughput = N / (first submit → last result), the median of a system's sweeps; "
        "latency = one task at a time, "
        "nearest-rank percentiles. Ratios: tasks/s above 1× is faster, p50 below 1× is faster.\n\n"
        f"## Machine\n\n{facts_text}\n\n"
        f"## Results\n\n{render_table(measurements)}"
        + (PAIRS_INTRO + render_pairs(measurements, pairs) if pairs else "")
    )


#: What the pairs table measures, and how to read it.
PAIRS_INTRO = (
    "\n## gc-fabric's htex engine beside Parsl's own HTEX\n\n"
    "Same worker count, one local block, CurveZMQ on in both. Ours is the whole path — "
    "Executor → RabbitMQ (publisher confirms, quorum queue) → agent → Parsl's HTEX → worker "
    "→ result over RabbitMQ, ledger on; theirs is Parsl's DataFlowKernel calling HTEX in the "
    "same process, one Parsl task per task. Ours hands Parsl the sweep's no-op tasks in "
    "bundles (up to 32 a Parsl task, `bundle_seconds`), so Parsl's cost per task is paid once "
    "a bundle; a lone call (the p50 columns) travels alone. Everything shares the machine's cores "
    "(more workers add contention rather than capacity on 2 cores, and other processes may "
    "run: see 'CPU busy before the run'), so read ratios, not absolute figures. Parsl gives a "
    "pool no more workers than the node has cores (`cores_per_worker` 1 by default, in both): "
    "on 2 cores the 4-worker rows run 2 workers.\n\n"
)


#: Sections of RESULTS.md that other commands write (``bench.memory``, ``bench.scale``): a run of
#: ``bench.run`` keeps them.
KEPT_SECTIONS = ("## Where the time goes (issue 14)", "## Before and after (issue 14)",
                 "## Memory on long sweeps", "## Scale (issue 13)")


def write_results(path: Path, text: str) -> None:
    """Write the rendered results to ``path``, creating its directory and keeping the
    sections other commands wrote there."""
    old = path.read_text() if path.exists() else ""
    for heading in KEPT_SECTIONS:
        kept = section_of(old, heading)
        if kept:
            text = replace_section(text, kept, heading)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def section_of(text: str, heading: str) -> str:
    """The section of ``text`` under ``heading`` (to the next ``## `` heading), or ''."""
    lines = text.splitlines(keepends=True)
    bounds = _section_bounds(lines, heading)
    return "".join(lines[bounds[0]:bounds[1]]) if bounds else ""


def replace_section(text: str, section: str, heading: str) -> str:
    """Return ``text`` with the section under ``heading`` replaced by ``section`` (or appended)."""
    lines = text.splitlines(keepends=True)
    bounds = _section_bounds(lines, heading)
    if bounds is None:
        return text.rstrip("\n") + "\n\n" + section if text.strip() else section
    tail = "".join(lines[bounds[1]:])
    return "".join(lines[:bounds[0]]) + section + ("\n" + tail if tail else "")


def _section_bounds(lines: list[str], heading: str) -> tuple[int, int] | None:
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return start, end

