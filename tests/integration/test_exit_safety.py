"""A program that submits and exits keeps its tasks: each one runs, however the program ends.

Every test runs a small program of its own in a subprocess, as a user would: it submits
1,000 quick tasks, prints their ids and exits without waiting for the results. The tasks
must all reach the endpoint and the ledger must record every one ``success``. When the
program left tasks running, it must have said on stderr how to reattach to its group.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from gc_client import Client
from gc_core.registry_api.schemas import TaskOut
from tests.fabric import Endpoint, Fabric

#: Tasks each program submits.
TASKS = 1000
#: Seconds a test waits for the ledger to record every task, so that it never hangs.
LEDGER_TIMEOUT = 120.0
#: Seconds without a single task newly recorded after which the rest are taken as lost.
STALL_TIMEOUT = 30.0
#: Seconds a program may take to submit and exit.
PROGRAM_TIMEOUT = 180.0

#: The program's start: submit TASKS no-op tasks, then print the group and the task ids.
SUBMIT_WITH_EXECUTOR = """
    import gc
    import json
    import os
    import sys

    from gc_client import Executor


    def echo(x):
        return x


    ex = Executor(endpoint_id=os.environ["GC_ENDPOINT_ID"])
    futures = [ex.submit(echo, i) for i in range({tasks})]
    print(json.dumps({{"task_group_id": ex.task_group_id,
                      "task_ids": [f.task_id for f in futures]}}), flush=True)
"""

#: How each program ends, right after submitting.
ENDINGS = {
    "falls_off_the_end": "",
    "shutdown_without_waiting": "ex.shutdown(wait=False)",
    "raises_an_uncaught_exception": "raise RuntimeError('boom after submitting')",
    "calls_sys_exit": "sys.exit(0)",
}


def _run_program(tmp_path: Path, fabric: Fabric, endpoint: Endpoint,
                 source: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``source`` as a script against the fabric; return it and when it was seen to end."""
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(source))
    done = subprocess.run([sys.executable, str(script)], check=False, cwd=tmp_path,
                          env={**fabric.env, "GC_ENDPOINT_ID": endpoint.endpoint_id},
                          capture_output=True, text=True, timeout=PROGRAM_TIMEOUT)
    return done, time.time()


def _submitted(done: subprocess.CompletedProcess[str]) -> tuple[str, list[str]]:
    """The task group id and the task ids the program printed."""
    assert done.stdout.strip(), f"the program printed no task ids; stderr:\n{done.stderr}"
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(printed["task_ids"]) == TASKS
    return printed["task_group_id"], printed["task_ids"]


def _ledger_once_settled(client: Client, task_ids: list[str]) -> list[TaskOut]:
    """The ledger's record of ``task_ids`` once all succeeded, or once none has been newly
    recorded for STALL_TIMEOUT seconds (the rest are lost), or at LEDGER_TIMEOUT."""
    deadline = time.monotonic() + LEDGER_TIMEOUT
    last_progress, last_count = time.monotonic(), -1
    while True:
        tasks = client.registry.get_tasks(task_ids)
        count = sum(t.status == "success" for t in tasks)
        now = time.monotonic()
        if count != last_count:
            last_progress, last_count = now, count
        if count == len(task_ids) or now > deadline or now - last_progress > STALL_TIMEOUT:
            return tasks
        time.sleep(0.5)


def _assert_every_task_succeeded(tasks: list[TaskOut]) -> None:
    statuses = Counter(t.status for t in tasks)
    assert statuses["success"] == len(tasks), (
        f"{len(tasks) - statuses['success']} of {len(tasks)} tasks never succeeded: "
        f"{dict(statuses)}")


def _assert_reattach_told_if_tasks_outlived_it(tasks: list[TaskOut], group: str,
                                                stderr: str, exited_by: float) -> None:
    """A task the agent finished after the program had ended was still running when the
    program left: then the program must have said how to reattach to its group. If every
    task finished before, the program may have waited for them, and need not say it."""
    finished = [t.timings.finished for t in tasks if t.timings.finished is not None]
    if finished and max(finished) > exited_by:
        assert f"task_group_id='{group}'" in stderr, (
            "tasks were still running when the program exited, yet it did not say how to "
            f"reattach to task group {group}; stderr:\n{stderr}")


def _assert_no_traceback_but_its_own(stderr: str, own: int = 0) -> None:
    """The client's exit is quiet: no traceback from its threads, only the program's own."""
    assert stderr.count("Traceback (most recent call last)") == own, stderr


@pytest.mark.parametrize("ending", list(ENDINGS), ids=list(ENDINGS))
def test_every_task_runs_when_the_program_exits_right_after_submitting(
        fabric: Fabric, endpoint: Endpoint, client: Client, tmp_path: Path, ending: str) -> None:
    # Given a program that submits 1,000 tasks and then ends without waiting for them
    program = SUBMIT_WITH_EXECUTOR.format(tasks=TASKS) + f"    {ENDINGS[ending]}\n"
    # When it runs to its end
    done, exited_by = _run_program(tmp_path, fabric, endpoint, program)
    if ending == "raises_an_uncaught_exception":
        assert done.returncode == 1, done.stderr
        assert "RuntimeError: boom after submitting" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
    group, task_ids = _submitted(done)
    # Then every task it was given an id for runs, and it told how to reattach if it left early
    tasks = _ledger_once_settled(client, task_ids)
    _assert_every_task_succeeded(tasks)
    _assert_reattach_told_if_tasks_outlived_it(tasks, group, done.stderr, exited_by)
    _assert_no_traceback_but_its_own(done.stderr,
                                     own=int(ending == "raises_an_uncaught_exception"))


def test_every_task_runs_when_the_executor_is_garbage_collected(
        fabric: Fabric, endpoint: Endpoint, client: Client, tmp_path: Path) -> None:
    # Given a program that drops its Executor and its futures right after submitting, and
    # collects them; os._exit then skips every interpreter-exit hook, so whatever is
    # published and confirmed was so when the Executor was collected
    program = SUBMIT_WITH_EXECUTOR.format(tasks=TASKS) + textwrap.indent(textwrap.dedent("""
        del ex, futures
        gc.collect()
        os._exit(0)
    """), "    ")
    done, _ = _run_program(tmp_path, fabric, endpoint, program)
    assert done.returncode == 0, done.stderr
    _group, task_ids = _submitted(done)
    # Then every task runs
    _assert_every_task_succeeded(_ledger_once_settled(client, task_ids))
    _assert_no_traceback_but_its_own(done.stderr)


def test_every_task_awaited_with_the_async_executor_runs_when_main_returns(
        fabric: Fabric, endpoint: Endpoint, client: Client, tmp_path: Path) -> None:
    # Given a program whose main awaits 1,000 submissions and returns without shutdown
    program = f"""
        import asyncio
        import json
        import os

        from gc_client import AsyncExecutor


        def echo(x):
            return x


        async def main():
            ex = AsyncExecutor(endpoint_id=os.environ["GC_ENDPOINT_ID"])
            futures = [await ex.submit(echo, i) for i in range({TASKS})]
            print(json.dumps({{"task_group_id": ex.task_group_id,
                              "task_ids": [f.task_id for f in futures]}}), flush=True)


        asyncio.run(main())
    """
    done, _ = _run_program(tmp_path, fabric, endpoint, program)
    assert done.returncode == 0, done.stderr
    _group, task_ids = _submitted(done)
    # Then every awaited submission was confirmed by the broker, so every task runs
    _assert_every_task_succeeded(_ledger_once_settled(client, task_ids))
    _assert_no_traceback_but_its_own(done.stderr)


def test_tasks_the_broker_did_not_confirm_in_time_are_named_on_stderr(
        fabric: Fabric, endpoint: Endpoint, client: Client, tmp_path: Path) -> None:
    # Given a program that gives the broker no time at all to confirm (confirm_timeout=0)
    # and exits right after submitting 1,000 tasks: the broker cannot confirm them all
    # in the instant between the last submit and the exit
    program = SUBMIT_WITH_EXECUTOR.format(tasks=TASKS).replace(
        'Executor(endpoint_id=os.environ["GC_ENDPOINT_ID"])',
        'Executor(endpoint_id=os.environ["GC_ENDPOINT_ID"], confirm_timeout=0)')
    # When it exits
    done, _ = _run_program(tmp_path, fabric, endpoint, program)
    assert done.returncode == 0, done.stderr
    _group, task_ids = _submitted(done)
    # Then it names the tasks the broker had not confirmed, by id
    named = _named_unconfirmed(done.stderr)
    assert named, f"no unconfirmed task named; stderr:\n{done.stderr}"
    assert named <= set(task_ids)
    # and every task it did not name reaches the ledger: none is lost without a word
    confirmed = [t for t in task_ids if t not in named]
    _assert_every_task_succeeded(_ledger_once_settled(client, confirmed))


def _named_unconfirmed(stderr: str) -> set[str]:
    """The task ids of the program's "the broker did not confirm" line."""
    lines = [line for line in stderr.splitlines() if "the broker did not confirm" in line]
    assert len(lines) <= 1, stderr
    return set(lines[0].rsplit(": ", 1)[1].split()) if lines else set()
