"""Command line for the benchmark: ``python -m bench.run --help`` (run from the repo root)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
from pathlib import Path

import click

from bench import harness, targets
from bench.systems import PAIRS, SystemSpec, select_systems

logger = logging.getLogger(__name__)

#: Our own logger; it logs at INFO while every other library stays at WARNING.
OWN_LOGGER = "bench"


def _configure_logging(verbose: bool) -> None:
    # Libraries stay at WARNING unless --verbose: per-task log lines in a client cost
    # throughput (Parsl's DEBUG log took ~30% of its rate), and we measure the systems.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger(OWN_LOGGER).setLevel(logging.DEBUG if verbose else logging.INFO)


def _run_rounds(specs: list[SystemSpec], rounds: int, tasks: int, latency_samples: int,
                warmup: int) -> list[harness.Measurement]:
    """Go over every system ``rounds`` times; a system that fails is left out of the rounds
    after and shows as a row with its error."""
    done: dict[str, list[harness.Round]] = {spec.name: [] for spec in specs}
    errors: dict[str, str] = {}
    share = math.ceil(latency_samples / rounds)
    for number in range(1, rounds + 1):
        logger.info("round %d of %d", number, rounds)
        for spec in specs:
            if spec.name in errors:
                continue
            try:
                done[spec.name].append(harness.measure(spec.build(), tasks, share, warmup))
            except Exception as exc:  # a failing system becomes a row, not a crashed run
                logger.exception("%s: failed", spec.name)
                errors[spec.name] = f"{type(exc).__name__}: {exc}" + (
                    f" (in round {number} of {rounds})" if rounds > 1 else "")
    return [harness.Measurement(system=spec.name, error=errors[spec.name])
            if spec.name in errors else harness.pooled(spec.name, tasks, done[spec.name])
            for spec in specs]


@click.command()
@click.option("--tasks", default=20000, show_default=True, help="Tasks per throughput sweep.")
@click.option("--rounds", default=harness.ROUNDS, show_default=True, type=click.IntRange(min=1),
              help="Times the run goes over every system, one sweep each time; a system's "
                   "rate is the median of its sweeps.")
@click.option("--latency-samples", default=500, show_default=True,
              help="Round trips per system, shared among the rounds.")
@click.option("--warmup", default=harness.WARMUP_TASKS, show_default=True, help="Tasks before measuring.")
@click.option("--systems", default="", help="Comma list of system names (default: all registered).")
@click.option(
    "--output",
    default="bench/RESULTS.md",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Markdown file to write.",
)
@click.option("--json", "json_output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write every system's figures to this file as JSON (bench.ab reads it).")
@click.option("--verbose", is_flag=True, help="Show every library's log lines.")
def main(tasks: int, rounds: int, latency_samples: int, warmup: int, systems: str, output: Path,
         json_output: Path | None, verbose: bool) -> None:
    """Run every system in turn, ``--rounds`` times over, print the table with ratios and
    write RESULTS.md."""
    _configure_logging(verbose)
    try:
        specs = select_systems(systems)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="--systems") from None
    command = harness.command_line()
    idle_check = harness.background_cpu_busy()
    logger.info("CPU busy before the run (other processes): %s", idle_check)
    measurements = _run_rounds(specs, rounds, tasks, latency_samples, warmup)
    pairs = [pair for pair in PAIRS if {m.system for m in measurements} >= set(pair)]
    click.echo(harness.render_table(measurements))
    if pairs:
        click.echo(harness.render_pairs(measurements, pairs))
    click.echo(targets.render_targets(measurements))
    click.echo(targets.render_cpu_table(measurements))
    text = harness.render_results(
        measurements,
        facts={**harness.machine_facts(), "CPU busy before the run": idle_check},
        command=command,
        when=datetime.datetime.now().astimezone(),
        settings={"tasks": tasks, "rounds": rounds, "latency_samples": latency_samples,
                  "warmup": warmup},
        pairs=pairs,
    ) + targets.render_sections(measurements)
    harness.write_results(output, text)
    click.echo(f"wrote {output}")
    if json_output is not None:
        json_output.write_text(json.dumps([dataclasses.asdict(m) for m in measurements], indent=1))


if __name__ == "__main__":
    main()
