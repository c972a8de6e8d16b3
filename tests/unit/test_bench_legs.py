"""bench.legs' section of RESULTS.md: its tables, and bench.run keeping it when it rewrites the file."""

from __future__ import annotations

import datetime
from pathlib import Path

from bench.harness import write_results
from bench.legs import HEADING, LEGS, Hop, Legs, render_section

WHEN = datetime.datetime(2026, 12, 6, 20, 0, tzinfo=datetime.timezone.utc)


def _section() -> str:
    return render_section([Hop("classic", 0.3, 0.9), Hop("quorum", 0.8, 2.0)],
                          [Legs("threads", 300, (1.2, 0.13, 0.03, 1.3, 2.7)),
                           Legs("processes", 300, (1.25, 0.21, 0.02, 1.5, 3.0))],
                          "python -m bench.legs", WHEN, "2%")


def test_the_section_has_a_row_per_hop_and_per_leg_with_a_column_per_engine() -> None:
    lines = _section().splitlines()

    assert lines[0] == HEADING
    assert "| quorum | 0.800 | 2.000 |" in lines
    client_leg = next(line for line in lines if line.startswith(f"| {LEGS[0][0]} |"))
    assert client_leg.endswith("| 1.200 | 1.250 |")
    # Two header rows, the two hops, and the legs.
    assert sum(line.startswith("| ") for line in lines) == 2 + 2 + len(LEGS)


def test_bench_run_keeps_the_section_when_it_rewrites_the_results(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# old results\n\n" + _section())

    write_results(results, "# new results\n\nnew table\n")

    text = results.read_text()
    assert text.startswith("# new results")
    assert "| quorum | 0.800 | 2.000 |" in text
