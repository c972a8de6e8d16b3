"""The benchmark's throughput figure: the median of several sweeps, their spread shown."""

from __future__ import annotations

import pytest

from bench.harness import Measurement, render_table, summarize


def test_throughput_is_the_median_of_the_rounds_and_keeps_each_rate() -> None:
    # Three sweeps of 1,000 tasks: 2.0 s, 1.0 s (a lucky one) and 1.25 s.
    m = summarize("x", 1000, [2.0, 1.0, 1.25], [0.001, 0.002, 0.003],
                  cpu_s={"client": 0.6, "agent": 0.3})

    assert m.tasks_per_s == 800
    assert m.rates == (500, 1000, 800)
    # CPU was measured over all three sweeps: 3,000 tasks.
    assert m.cpu_per_task_s == pytest.approx({"client": 200e-6, "agent": 100e-6})


def test_the_results_table_shows_the_spread_of_the_rounds() -> None:
    table = render_table([
        summarize("raw-amqp-reliable", 1000, [1.0, 1.0, 1.0], [0.001]),
        summarize("gc-fabric-threads", 1000, [2.0, 1.0, 1.25], [0.002]),
        Measurement("celery-threads", tasks_per_s=100, p50_ms=2.0),
    ])
    header, _, _, threads, celery = table.splitlines()

    assert "tasks/s, each round" in header
    assert "| 800 | 500 – 1,000 |" in threads
    assert "| 100 | – |" in celery  # one round: no spread to show
