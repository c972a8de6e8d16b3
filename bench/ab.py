"""Two versions of the code measured in turns: ``python -m bench.ab --help``.

These machines' speed drifts by half within minutes, so a run of one version and then a
run of the other compares two spells of the machine, not two versions. ``bench.ab``
measures the working tree (the change) and a revision (the base, HEAD unless told) in
pairs, each a ``bench.run`` of one round of one system in one version's own checkout
right after one in the other's, which goes first alternating, and reports every pair's
ratio and their median. A change is faster only where most pairs say so; the ratios'
spread shows how far one pair can be trusted.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import click

from bench.peers._process import REPO_ROOT

#: The two sides of a pair.
BASE, CHANGE = "base", "change"
#: The systems measured unless told otherwise: gc-fabric's local engines.
DEFAULT_SYSTEMS = "gc-fabric-threads,gc-fabric-processes"
#: Longest a single run of ``bench.run`` may take, in seconds.
RUN_TIMEOUT_S = 1800


#: The figures compared, by name in the report, with how their values are shown. Every
#: one but the rate is better lower; CPU per task comes whole, then by role (``bench.cpu``).
RATE, CPU, P50 = "tasks/s", "CPU µs/task", "p50 ms"
SHOWN = {RATE: ",.0f", P50: ".2f"}

#: What one run measured of one system: each figure's value by name.
Figures = Mapping[str, float]

#: The report's header row.
REPORT_HEADER = ("| system | figure | base, each pair | change, each pair | change / base, each pair "
                 "| median ratio | change better in |")
#: Prints where a checkout's runs import the benchmark and gc-fabric from.
IMPORT_PROBE = ("import bench, gc_agent, gc_client, gc_core; "
                "print('\\n'.join(m.__file__ for m in (bench, gc_agent, gc_client, gc_core)))")

#: One pair: each side's figures by system.
Pair = Mapping[str, Mapping[str, Figures]]


def run_order(pairs: int, systems: Sequence[str]) -> list[tuple[int, str, str]]:
    """The runs, in order, as (pair, system, side): the two sides of a system's pair run
    one right after the other (this machine's slow spells last about as long as a few
    runs, and two runs far apart meet different ones), and which goes first alternates
    from one pair to the next and from one system to the next, so that a machine speeding
    up or slowing down over the whole run favours neither."""
    return [(number, system, side)
            for number in range(pairs)
            for index, system in enumerate(systems)
            for side in ((BASE, CHANGE) if (number + index) % 2 == 0 else (CHANGE, BASE))]


def figures_from_json(text: str) -> dict[str, Figures]:
    """The figures of every system that ran without error, from ``bench.run --json``."""
    figures: dict[str, Figures] = {}
    for row in json.loads(text):
        if row.get("error") or row.get("tasks_per_s") is None:
            continue
        by_role = {role: seconds * 1e6 for role, seconds in row.get("cpu_per_task_s", {}).items()}
        figures[row["system"]] = {RATE: row["tasks_per_s"], CPU: sum(by_role.values()),
                                  **{f"{CPU}, {role}": us for role, us in by_role.items()},
                                  P50: row["p50_ms"]}
    return figures


def render_report(pairs: Sequence[Pair], systems: Sequence[str]) -> str:
    """A markdown table: for each system and figure, each pair's base and change values,
    the change's ratio to the base in each pair, their median, and how many pairs found
    the change better. A system missing from either side of a pair (it failed there) is
    left out of that pair and named below the table."""
    lines = [REPORT_HEADER, "|---|---|---|---|---|---:|---|"]
    failed: list[str] = []
    for system in systems:
        whole = [pair for pair in pairs if all(system in pair[side] for side in (BASE, CHANGE))]
        if len(whole) < len(pairs):
            failed.append(f"{system}: {len(pairs) - len(whole)} of {len(pairs)} pairs failed")
        if not whole:
            continue
        # (a figure some run lacks, a role with no process there, is left out)
        names = [name for name in whole[0][BASE][system]
                 if all(name in pair[side][system] for pair in whole for side in (BASE, CHANGE))]
        for name in names:
            base = [pair[BASE][system][name] for pair in whole]
            change = [pair[CHANGE][system][name] for pair in whole]
            ratios = [c / b if b else float("nan") for b, c in zip(base, change)]
            better = sum((r > 1) if name == RATE else (r < 1) for r in ratios)
            shown = SHOWN.get(name, ".0f")
            lines.append(
                f"| {system} | {name} | {_values(base, shown)} | {_values(change, shown)} | "
                f"{' · '.join(f'{r:.2f}×' for r in ratios)} | {statistics.median(ratios):.2f}× | "
                f"{better} of {len(ratios)} |")
    if failed:
        lines += ["", "Left out (the run failed: see its log): " + "; ".join(failed) + "."]
    return "\n".join(lines)


def _values(values: Sequence[float], shown: str) -> str:
    return " · ".join(format(value, shown) for value in values)


@contextmanager
def checkout_of(revision: str) -> Iterator[Path]:
    """A detached worktree of ``revision`` in a temporary folder, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="gc-bench-ab-"))
    checkout = folder / "base"
    _git("worktree", "add", "--detach", "--quiet", str(checkout), revision)
    try:
        yield checkout
    finally:
        _git("worktree", "remove", "--force", str(checkout))
        folder.rmdir()


def _git(*args: str) -> None:
    done = subprocess.run(["git", *args], check=False, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode:
        raise click.ClickException(f"git {' '.join(args)}: {done.stderr.strip()}")


def measure(checkout: Path, run_args: Sequence[str], log: Path) -> dict[str, Figures]:
    """Run ``bench.run`` once in ``checkout`` (its own code, this interpreter) and return
    its figures; its output goes to ``log``."""
    result = log.with_suffix(".json")
    command = [sys.executable, "-m", "bench.run", *run_args, "--output",
               str(log.with_suffix(".md")), "--json", str(result)]
    with log.open("w") as out:
        try:
            done = subprocess.run(command, check=False, cwd=checkout, env=_env_for(checkout),
                                  stdout=out, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise click.ClickException(f"bench.run in {checkout} took over {RUN_TIMEOUT_S} s; "
                                       f"its output: {log}") from None
    if done.returncode:
        output = log.read_text()
        no_json = "No such option" in output and "--json" in output
        raise click.ClickException(
            f"bench.run failed in {checkout} (exit {done.returncode}); its output: {log}"
            + ("; that revision's bench.run has no --json: bench.ab needs a base from the "
               "commit that added bench/ab.py on" if no_json else ""))
    return figures_from_json(result.read_text())


def _env_for(checkout: Path) -> dict[str, str]:
    """This environment with ``checkout`` first on the import path, so that the run, and
    the registry and agent it starts (``bench.peers._process`` adds its own root), import
    that checkout's code rather than the installed one."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}


def check_imports_from(checkout: Path) -> None:
    """Refuse to measure a checkout whose runs would import gc-fabric from elsewhere."""
    probe = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], check=False, cwd=checkout,
        env=_env_for(checkout), capture_output=True, text=True)
    elsewhere = [path for path in probe.stdout.split()
                 if not Path(path).resolve().is_relative_to(checkout.resolve())]
    if probe.returncode or elsewhere:
        raise click.ClickException(f"runs in {checkout} would not import its own code "
                                   f"({probe.stderr.strip() or ', '.join(elsewhere)})")


@click.command()
@click.option("--base", default="HEAD", show_default=True,
              help="The revision the working tree is compared with.")
@click.option("--pairs", default=4, show_default=True, type=click.IntRange(min=1),
              help="Pairs of runs; the order inside a pair alternates.")
@click.option("--systems", default=DEFAULT_SYSTEMS, show_default=True,
              help="Comma list of bench.run's system names.")
@click.option("--tasks", default=20000, show_default=True, help="Tasks per throughput sweep.")
@click.option("--latency-samples", default=100, show_default=True,
              help="Round trips per system and run.")
@click.option("--warmup", default=200, show_default=True, help="Tasks before measuring.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the report to this file.")
def main(base: str, pairs: int, systems: str, tasks: int, latency_samples: int, warmup: int,
         output: Path | None) -> None:
    """Measure the working tree against BASE, in pairs of one-round bench.runs of each
    system, and print each pair's ratios with their median. Run from the repo root; the working
    tree is measured as it is, uncommitted changes included."""
    run_args = ["--rounds", "1", "--tasks", str(tasks),
                "--latency-samples", str(latency_samples), "--warmup", str(warmup)]
    names = [name.strip() for name in systems.split(",") if name.strip()]
    logs = Path(tempfile.mkdtemp(prefix="gc-bench-ab-logs-"))
    with checkout_of(base) as base_checkout:
        checkouts = {BASE: base_checkout, CHANGE: REPO_ROOT}
        for checkout in checkouts.values():
            check_imports_from(checkout)
        done: list[dict[str, dict[str, Figures]]] = [{BASE: {}, CHANGE: {}} for _ in range(pairs)]
        for number, system, side in run_order(pairs, names):
            click.echo(f"pair {number + 1} of {pairs}, {system}: {side} ...", err=True)
            done[number][side].update(measure(checkouts[side], ["--systems", system, *run_args],
                                              logs / f"{number + 1}-{system}-{side}.log"))
    report = (f"{CHANGE}: the working tree of {REPO_ROOT}; {BASE}: {base}; {pairs} pairs, "
              f"{tasks:,} tasks a sweep; runs' logs in {logs}\n\n"
              + render_report(done, names))
    click.echo(report)
    if output is not None:
        output.write_text(report + "\n")


if __name__ == "__main__":
    main()
