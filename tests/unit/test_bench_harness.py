"""The benchmark's figures: the median of sweeps spread over rounds of every system, their
spread shown."""

from __future__ import annotations

import gc

import pytest

from bench.cpu import ProcessRoot
from bench.harness import Measurement, Round, System, pooled, render_table, summarize
from bench.run import _run_rounds
from bench.systems import SystemSpec


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


def test_a_systems_figures_pool_its_rounds() -> None:
    rounds = [Round((2.0,), (0.003, 0.001), {"client": 0.4}),
              Round((1.0,), (0.002,), {"client": 0.2, "agent": 0.3}),
              Round((1.25,), (0.004,), {"client": 0.3})]

    m = pooled("x", 1000, rounds)

    assert m.rates == (500, 1000, 800) and m.tasks_per_s == 800
    # percentiles of the four round trips of all rounds
    assert (m.p50_ms, m.p99_ms) == pytest.approx((2.0, 4.0))
    assert m.cpu_per_task_s == pytest.approx({"client": 300e-6, "agent": 100e-6})


#: What the systems below did, in order: (system, what).
LOG: list[tuple[str, str]] = []


class LoggedSystem(System):
    """A system of no work at all that logs what the harness asks of it; ``fail_in`` makes
    its throughput sweep raise in that round."""

    uses_rabbitmq = False

    def __init__(self, name: str, fail_in: int = 0) -> None:
        self.name = name
        self._fail_in = fail_in

    def start(self) -> None:
        LOG.append((self.name, "start"))

    def stop(self) -> None:
        LOG.append((self.name, "stop"))

    def run_throughput(self, n: int) -> float:
        if n > WARMUP and self._fail_in == sum(1 for entry in LOG if entry == (self.name, "start")):
            raise RuntimeError("it broke")
        LOG.append((self.name, f"sweep {n}"))
        return n / 1000

    def run_latency(self, n: int) -> list[float]:
        LOG.append((self.name, f"round trips {n}"))
        return [0.001] * n

    def processes(self) -> list[ProcessRoot]:
        return []


WARMUP = 10


def test_the_run_goes_over_every_system_once_a_round_and_a_failing_one_is_left_out_after() -> None:
    LOG.clear()
    specs = [SystemSpec("a", f"{__name__}:LoggedSystem", {"name": "a"}),
             SystemSpec("b", f"{__name__}:LoggedSystem", {"name": "b", "fail_in": 2})]

    a, b = _run_rounds(specs, rounds=3, tasks=1000, latency_samples=10, warmup=WARMUP)

    # Each round starts, sweeps once and stops each system in turn; b broke in round 2
    assert [name for name, what in LOG if what == "start"] == ["a", "b", "a", "b", "a"]
    assert [name for name, what in LOG if what == "sweep 1000"] == ["a", "b", "a", "a"]
    assert LOG.count(("a", "round trips 4")) == 3  # 10 round trips shared by 3 rounds
    assert LOG.count(("b", "stop")) == 2  # stopped after it broke too
    assert (a.rates, a.tasks_per_s, a.error) == ((1000, 1000, 1000), 1000, None)
    assert b.error == "RuntimeError: it broke (in round 2 of 3)"
    # and the collector is left as it was: a frozen heap hides from gc.get_objects(), which
    # a later test in this process may count on
    assert gc.get_freeze_count() == 0
