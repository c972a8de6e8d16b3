"""Issue 14's targets table: each verdict reads its ratio the right way round."""

from __future__ import annotations

from bench.harness import Measurement
from bench.targets import render_cpu_table, render_targets


def _row(table: str, figure: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {figure}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def _run(threads_p50: float) -> list[Measurement]:
    return [
        Measurement("raw-amqp-reliable", tasks_per_s=1000, p50_ms=1.0),
        Measurement("raw-amqp-quorum", tasks_per_s=1500, p50_ms=2.0),
        Measurement("dramatiq", tasks_per_s=250, p50_ms=1.2),
        Measurement("gc-fabric-processes", tasks_per_s=1200, p50_ms=1.1,
                    cpu_per_task_s={"client": 100e-6, "agent": 150e-6}),
        Measurement("gc-fabric-threads", tasks_per_s=900, p50_ms=threads_p50,
                    cpu_per_task_s={"client": 100e-6, "agent": 250e-6}),
        Measurement("gc-fabric-htex-sim-64w", tasks_per_s=1000, p50_ms=2.0),
        Measurement("gc-fabric-htex-sim-1000w", error="TimeoutError: 10 of 20000 tasks unfinished"),
    ]


def test_a_faster_sweep_meets_its_target_and_a_slower_one_does_not() -> None:
    table = render_targets(_run(threads_p50=1.1))

    assert _row(table, "sweep throughput, processes engine")[1:] == ["1.20×", "≥ 1.0×", "yes"]
    assert _row(table, "sweep throughput, threads engine")[1:] == ["0.90×", "≥ 1.0×", "no"]
    assert _row(table, "sweep throughput vs Dramatiq")[1:] == [
        "4.80× (processes), 3.60× (threads)", "≥ 4×", "no"]


def test_a_p50_must_be_low_against_the_wire_and_below_dramatiqs() -> None:
    below = render_targets(_run(threads_p50=1.1))
    above_dramatiq = render_targets(_run(threads_p50=1.3))

    assert _row(below, "single-call p50")[-1] == "yes"
    assert _row(above_dramatiq, "single-call p50")[1:] == [
        "1.10× (processes), 1.30× (threads); Dramatiq 1.20×", "≤ 1.5× (and below Dramatiq's)", "no"]


def test_the_quorum_wire_is_context_without_a_verdict() -> None:
    table = render_targets(_run(threads_p50=1.1))

    assert _row(table, "sweep throughput vs raw-amqp-quorum")[1:] == [
        "0.80× (processes), 0.60× (threads)", "context: no target", "–"]
    assert _row(table, "single-call p50 vs raw-amqp-quorum")[1:] == [
        "0.55× (processes), 0.55× (threads)", "context: no target", "–"]


def test_a_missing_or_failed_row_gives_no_verdict() -> None:
    table = render_targets(_run(threads_p50=1.1))

    assert _row(table, "htex engine vs Parsl HTEX direct, 1/2/4 workers, throughput")[1:] == [
        "– / – / –", "≥ 0.9×", "–"]
    assert _row(table, "1,000 simulated workers")[-1] == "–"


def test_cpu_per_task_is_summed_over_processes_in_microseconds() -> None:
    run = _run(threads_p50=1.1)

    assert _row(render_targets(run), "CPU per task")[1:] == [
        "250 µs (processes), 350 µs (threads); by process below", "reported per process; ≤ 300 µs", "no"]
    assert _row(render_cpu_table(run), "gc-fabric-threads") == [
        "gc-fabric-threads", "100", "–", "–", "250", "–", "–", "–", "350"]


def test_the_quorum_wire_alone_shows_the_floor_under_the_p50_target() -> None:
    table = render_targets(_run(threads_p50=1.1))

    # raw-amqp-quorum's p50 (2.0 ms) over raw-amqp-reliable's (1.0 ms): before any of ours.
    assert _row(table, "single-call p50 of the wire alone through quorum queues")[1:] == [
        "2.00×", "context: ours cannot go below it", "–"]


def test_cpu_per_task_against_the_wires_own_reads_across_machines() -> None:
    raw = Measurement("raw-amqp-reliable", tasks_per_s=1000, p50_ms=1.0,
                      cpu_per_task_s={"client": 25e-6, "broker": 100e-6})
    table = render_targets([raw, *_run(threads_p50=1.1)[1:]])

    # 250 µs and 350 µs against the wire's 125 µs, measured in the same run
    assert _row(table, "CPU per task vs raw-amqp-reliable's")[1:] == [
        "2.00× (processes), 2.80× (threads)", "context: no target", "–"]
