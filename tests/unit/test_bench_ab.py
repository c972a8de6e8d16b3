"""bench.ab: two versions measured in alternating pairs, each pair's ratios and their median."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ab import BASE, CHANGE, CPU, P50, RATE, figures_from_json, render_report, run_order
from bench.peers._process import REPO_ROOT


def test_a_systems_two_sides_run_back_to_back_and_which_goes_first_alternates() -> None:
    assert run_order(2, ["x", "y"]) == [
        (0, "x", BASE), (0, "x", CHANGE), (0, "y", CHANGE), (0, "y", BASE),
        (1, "x", CHANGE), (1, "x", BASE), (1, "y", BASE), (1, "y", CHANGE)]


def test_figures_come_from_bench_runs_json_and_a_failed_system_is_left_out() -> None:
    text = json.dumps([
        {"system": "a", "tasks_per_s": 1000.0, "p50_ms": 2.5, "p99_ms": 4.0, "error": None,
         "cpu_per_task_s": {"client": 60e-6, "agent": 90e-6}, "rates": [1000.0]},
        {"system": "b", "tasks_per_s": None, "p50_ms": None, "p99_ms": None,
         "error": "RuntimeError: no broker", "cpu_per_task_s": {}, "rates": []},
    ])

    figures = figures_from_json(text)

    assert list(figures) == ["a"]
    assert figures["a"] == pytest.approx({RATE: 1000.0, CPU: 150.0, f"{CPU}, client": 60.0,
                                          f"{CPU}, agent": 90.0, P50: 2.5})


def test_the_report_gives_each_pairs_ratio_their_median_and_which_way_they_point() -> None:
    def figures(rate: float, cpu: float, p50: float, **by_role: float) -> dict[str, float]:
        return {RATE: rate, CPU: cpu, **{f"{CPU}, {r}": us for r, us in by_role.items()}, P50: p50}

    pairs = [
        {BASE: {"x": figures(1000, 200, 3.0, agent=80)},
         CHANGE: {"x": figures(1100, 180, 3.0, agent=60)}},
        {BASE: {"x": figures(800, 250, 4.0, agent=100, workers=40)},
         CHANGE: {"x": figures(760, 240, 3.6, agent=90)}},
        {BASE: {"x": figures(900, 210, 3.0, agent=90), "y": figures(10, 1, 1.0)},
         CHANGE: {"x": figures(1080, 200, 3.3, agent=90)}},
    ]

    report = render_report(pairs, ["x", "y"])
    rows = {line.split(" | ")[1]: line for line in report.splitlines() if line.startswith("| x |")}

    assert list(rows) == ["tasks/s", "CPU µs/task", "CPU µs/task, agent", "p50 ms"]

    # tasks/s: 1.10, 0.95 and 1.20; two of three pairs faster.
    assert "| 1,000 · 800 · 900 | 1,100 · 760 · 1,080 | 1.10× · 0.95× · 1.20× | 1.10× | 2 of 3 |" \
        in rows["tasks/s"]
    # CPU and p50: lower is better (a ratio of exactly 1 is no better).
    assert rows["CPU µs/task"].endswith("| 0.95× | 3 of 3 |")
    assert rows["p50 ms"].endswith("| 1.00× | 1 of 3 |")
    assert "| 80 · 100 · 90 | 60 · 90 · 90 | 0.75× · 0.90× · 1.00× | 0.90× | 2 of 3 |" \
        in rows["CPU µs/task, agent"]
    # (workers: in one run only, so not compared)
    # y ran on one side of one pair only: it is named, not compared.
    assert "| y |" not in report
    assert "y: 3 of 3 pairs failed" in report


def test_bench_run_writes_its_figures_as_json_for_bench_ab(tmp_path: Path, vhost: str) -> None:
    # (vhost: the shared broker is there, or the test is skipped/failed as every broker test)
    result = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--systems", "raw-amqp-transient", "--rounds", "1",
         "--tasks", "300", "--latency-samples", "5", "--warmup", "20",
         "--output", str(tmp_path / "results.md"), "--json", str(result)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stdout + done.stderr
    figures = figures_from_json(result.read_text())
    assert list(figures) == ["raw-amqp-transient"]
    assert figures["raw-amqp-transient"][RATE] > 0
    assert figures["raw-amqp-transient"][CPU] > 0
