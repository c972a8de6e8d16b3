"""Command line for the benchmark: ``python -m bench.run --help`` (run from the repo root)."""

from __future__ import annotations

import datetime
import logging
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


def _measure(spec: SystemSpec, tasks: int, latency_samples: int, warmup: int,
             rounds: int) -> harness.Measurement:
    try:
        system = spec.build()
    except Exception as exc:
        logger.exception("%s: cannot build", spec.name)
        return harness.Measurement(system=spec.name, error=f"{type(exc).__name__}: {exc}")
    return harness.measure(system, tasks, latency_samples, warmup, rounds)


@click.command()
@click.option("--tasks", default=20000, show_default=True, help="Tasks per throughput sweep.")
@click.option("--rounds", default=harness.THROUGHPUT_ROUNDS, show_default=True,
              type=click.IntRange(min=1), help="Throughput sweeps per system; its rate is their median.")
@click.option("--latency-samples", default=500, show_default=True, help="Round trips per latency run.")
@click.option("--warmup", default=harness.WARMUP_TASKS, show_default=True, help="Tasks before measuring.")
@click.option("--systems", default="", help="Comma list of system names (default: all registered).")
@click.option(
    "--output",
    default="bench/RESULTS.md",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Markdown file to write.",
)
@click.option("--verbose", is_flag=True, help="Show every library's log lines.")
def main(tasks: int, rounds: int, latency_samples: int, warmup: int, systems: str, output: Path,
         verbose: bool) -> None:
    """Run each system in turn, print the table with ratios and write RESULTS.md."""
    _configure_logging(verbose)
    try:
        specs = select_systems(systems)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="--systems") from None
    command = harness.command_line()
    idle_check = harness.background_cpu_busy()
    logger.info("CPU busy before the run (other processes): %s", idle_check)
    measurements = [_measure(spec, tasks, latency_samples, warmup, rounds) for spec in specs]
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


if __name__ == "__main__":
    main()
