"""The high-throughput engine (Parsl's HighThroughputExecutor) through the whole fabric.

One endpoint with a LocalProvider block of two workers serves every test in this module:
client ─▶ RabbitMQ ─▶ agent ─▶ interchange ─▶ worker pool ─▶ workers, and back.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("parsl", reason="the htex engine needs Parsl (pip install parsl)")

from gc_agent.config import HtexEngineConfig, load_config, save_config
from gc_agent.providers import LocalProviderConfig
from gc_client import Client, Executor, TaskExecutionFailed
from gc_core.errors import WorkerLost
from gc_core.serialize import CLOUDPICKLE
from tests.fabric import Endpoint, Fabric, eventually
from tests.integration.test_multiuser import USER_PYTHON, accounts  # noqa: F401 - a fixture

#: Repository root: the worker pools import this module's functions (pickled by reference).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Seconds a test waits for a result; the first ones wait for the worker pool to come up.
RESULT_TIMEOUT = 90


def square(x: int) -> int:
    return x * x


def divide(a: float, b: float) -> float:
    return a / b


def seen_resource_spec() -> dict[str, Any]:
    from gc_core.task_context import current_resource_spec

    return current_resource_spec()


def fabric_variables() -> list[str]:
    import os

    return sorted(name for name in os.environ if name.startswith("GC_"))


def lose_once(marker: str, seconds: float) -> str:
    """First run: note this worker's pid and sleep (to be killed); a later run: return at once."""
    import os
    from pathlib import Path

    path = Path(marker)
    if path.exists():
        return f"rerun after {path.read_text()} was lost"
    path.write_text(str(os.getpid()))
    time.sleep(seconds)
    return "not killed"


def kill_own_worker() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def move_into_a_directory_it_deletes(path: str) -> int:
    import os
    import shutil

    os.makedirs(path)
    os.chdir(path)
    shutil.rmtree(path)
    return os.getpid()


def where_this_worker_runs() -> tuple[int, str]:
    import os

    return os.getpid(), os.getcwd()


def leave_an_alarm_and_ignore_children() -> int:
    """Arm a timeout and ignore SIGCHLD, then return without undoing either."""
    import os
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    return os.getpid()


def exit_code_after_a_while() -> tuple[int, int]:
    """This worker's pid and a subprocess's exit code, half a second from now."""
    import os
    import subprocess

    time.sleep(0.5)
    return os.getpid(), subprocess.run(["sh", "-c", "exit 3"], check=False).returncode


@pytest.fixture(scope="module")
def htex_endpoint(fabric: Fabric) -> Iterator[Endpoint]:
    """An endpoint whose engine is HTEX on one local block of two workers."""
    ep = _started_htex_endpoint(fabric)
    yield ep
    ep.stop_all()


def _started_htex_endpoint(fabric: Fabric, **engine_options: Any) -> Endpoint:
    """An endpoint whose engine is HTEX on one local block of two workers, started."""
    ep = fabric.configure_endpoint(f"htex-{uuid.uuid4().hex[:8]}", heartbeat_period=1.0)
    engine = HtexEngineConfig(
        type="htex", max_workers_per_node=2, max_retries_on_system_failure=2,
        heartbeat_period=1,  # the worker pool checks for dead workers this often
        provider=LocalProviderConfig(init_blocks=1, min_blocks=1, max_blocks=1,
                                     worker_init=f"export PYTHONPATH={REPO_ROOT}"),
        **engine_options)
    path = ep.directory / "config.yaml"
    save_config(load_config(path).model_copy(update={"engine": engine}), path)
    assert load_config(path).engine == engine  # what the agent reads back is what was meant
    ep.start()
    return ep


def test_a_sweep_of_50_tasks_on_htex_returns_every_value(client: Client,
                                                        htex_endpoint: Endpoint) -> None:
    with Executor(endpoint_id=htex_endpoint.endpoint_id, client=client) as ex:
        futures = [ex.submit(square, x) for x in range(50)]
        results = [f.result(timeout=RESULT_TIMEOUT) for f in futures]

    assert results == [x * x for x in range(50)]
    assert "htex" in htex_endpoint.read_logs()


def test_a_sweep_s_batches_of_quick_tasks_reach_parsl_in_bundles(client: Client,
                                                                   fabric: Fabric) -> None:
    # Given an endpoint whose Parsl takes 100 Parsl tasks a worker (so that jobs arriving one
    # by one would all travel alone), and a quick function it has run a few times
    ep = _started_htex_endpoint(fabric, parsl_tasks_per_worker=100)
    try:
        def sent() -> tuple[int, int]:
            status = client.get_endpoint_status(ep.endpoint_id).details.get("engine_status", {})
            return status.get("tasks_sent", 0), status.get("parsl_tasks_sent", 0)

        with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
            for x in range(7):
                ex.submit(square, x).result(timeout=RESULT_TIMEOUT)
            before = eventually(lambda: (now := sent())[0] == 7 and now, RESULT_TIMEOUT,
                                "the seven in a heartbeat")

            # When a sweep's tasks reach the agent in batches (the Executor's)
            assert list(ex.map(square, range(200), timeout=RESULT_TIMEOUT)) == [
                x * x for x in range(200)]

        # Then each batch's tasks reached Parsl together
        after = eventually(lambda: (now := sent())[0] == 207 and now, RESULT_TIMEOUT,
                           "the sweep in a heartbeat")
        assert after[1] - before[1] <= 100, (before, after)
    finally:
        ep.stop_all()


def test_a_remote_exception_on_htex_comes_back_as_task_execution_failed(
        client: Client, htex_endpoint: Endpoint) -> None:
    with Executor(endpoint_id=htex_endpoint.endpoint_id, client=client) as ex:
        future = ex.submit(divide, 1, 0)
        with pytest.raises(TaskExecutionFailed) as caught:
            future.result(timeout=RESULT_TIMEOUT)

    assert caught.value.remote_type == "ZeroDivisionError"
    assert "in divide" in caught.value.remote_traceback


def test_the_resource_specification_reaches_the_htex_worker(client: Client,
                                                            htex_endpoint: Endpoint) -> None:
    spec = {"priority": 3, "num_nodes": 1}  # Parsl takes the priority; the task sees both

    with Executor(endpoint_id=htex_endpoint.endpoint_id, client=client,
                  resource_specification=spec) as ex:
        seen = ex.submit(seen_resource_spec).result(timeout=RESULT_TIMEOUT)

    assert seen == spec


def test_htex_task_code_never_sees_the_agents_fabric_settings(client: Client,
                                                              htex_endpoint: Endpoint) -> None:
    # A block inherits the agent's environment, as a batch job inherits its submitter's:
    # the broker URL and the agent's token must not reach the code it runs.
    with Executor(endpoint_id=htex_endpoint.endpoint_id, client=client) as ex:
        seen = ex.submit(fabric_variables).result(timeout=RESULT_TIMEOUT)

    assert seen == []


def test_each_htex_task_starts_in_its_workers_own_directory(client: Client, htex_endpoint: Endpoint,
                                                             tmp_path: Path) -> None:
    # One task at a time, so each lands on whichever worker is free: a worker that ran a
    # task that moved into a directory and deleted it runs a later task where it started.
    with Executor(endpoint_id=htex_endpoint.endpoint_id, client=client) as ex:
        _, home = ex.submit(where_this_worker_runs).result(timeout=RESULT_TIMEOUT)
        moved: set[int] = set()
        checked = 0
        for n in range(6):
            moved.add(ex.submit(move_into_a_directory_it_deletes, str(tmp_path / f"d{n}"))
                      .result(timeout=RESULT_TIMEOUT))
            for _ in range(2):  # the pool may hand tasks to its workers in turn
                pid, where = ex.submit(where_this_worker_runs).result(timeout=RESULT_TIMEOUT)
                assert where == home  # the pool's workers all start where its manager does
                checked += pid in moved

    assert checked >= 3  # enough tasks followed a move on their worker to mean something


def test_an_htex_task_leaves_no_timer_or_signal_handler_to_the_next(client: Client,
                                                                     htex_endpoint: Endpoint) -> None:
    # A timeout armed and not disarmed killed the next task's worker (SIGALRM), and SIGCHLD
    # ignored made every later subprocess's exit code 0 there.
    with Executor(endpoint_id=htex_endpoint.endpoint_id, client=client) as ex:
        ex.submit(square, 2).result(timeout=RESULT_TIMEOUT)  # the pool is up
        touched: set[int] = set()
        checked = 0
        for _ in range(4):
            touched.add(ex.submit(leave_an_alarm_and_ignore_children).result(timeout=RESULT_TIMEOUT))
            for _ in range(2):  # the pool may hand tasks to its workers in turn
                pid, code = ex.submit(exit_code_after_a_while).result(timeout=RESULT_TIMEOUT)
                assert code == 3
                checked += pid in touched

    assert checked >= 2  # enough tasks followed such a task on its worker to mean something


def test_a_task_whose_htex_worker_is_killed_runs_again_and_succeeds(
        client: Client, htex_endpoint: Endpoint, tmp_path: Path) -> None:
    marker = tmp_path / "worker.pid"

    with Executor(endpoint_id=htex_endpoint.endpoint_id, client=client) as ex:
        # Given a task running on an HTEX worker
        future = ex.submit(lose_once, str(marker), 120)
        pid = int(eventually(lambda: marker.exists() and marker.read_text(), RESULT_TIMEOUT,
                             "the task to start"))
        assert "process_worker_pool" in _parent_command(pid), "the task runs in an HTEX worker"

        # When that worker is killed
        os.kill(pid, signal.SIGKILL)

        # Then the pool reports it lost, the engine runs the task again, and it succeeds
        assert future.result(timeout=RESULT_TIMEOUT) == f"rerun after {pid} was lost"
    assert "lost its worker" in htex_endpoint.read_logs()


def test_a_task_that_keeps_killing_its_worker_fails_with_worker_lost_naming_the_host(
        client: Client, htex_endpoint: Endpoint) -> None:
    with Executor(endpoint_id=htex_endpoint.endpoint_id, client=client) as ex:
        future = ex.submit(kill_own_worker)
        with pytest.raises(WorkerLost) as caught:
            future.result(timeout=RESULT_TIMEOUT)

    # the first run and max_retries_on_system_failure (2) more, each losing its worker
    assert caught.value.remote_type == "WorkerLost"
    assert "lost with its worker 3 times" in caught.value.remote_message
    assert f"on host {socket.gethostname()}" in caught.value.remote_message


def test_the_htex_engine_cancels_or_hands_back_jobs_still_waiting_and_abandons_the_others(
        tmp_path: Path) -> None:
    from gc_agent.engines.htex import HtexEngine
    from gc_agent.execution import Job, Outcome

    # Given an engine with room for two jobs (and no block yet, so nothing runs)
    engine = HtexEngine(HtexEngineConfig(type="htex", max_workers_per_node=2, parsl_tasks_per_worker=1,
                                         provider=LocalProviderConfig(init_blocks=0, min_blocks=0,
                                                                      max_blocks=1)), tmp_path / "run")
    outcomes: dict[str, Outcome] = {}
    jobs = [Job(task_id=f"t{n}", function_id="f", function_payload=b"", function_python="",
                content_type="", payload=b"", sender_python="", sender_serializer="")
            for n in range(4)]
    engine.start()
    try:
        # When four arrive: two go to Parsl, two wait in the engine
        for job in jobs:
            engine.submit(job, lambda outcome: outcomes.__setitem__(outcome.task_id, outcome))
        assert (engine.capacity, engine.busy) == (2, 2)

        # Then a waiting job is removed, one Parsl holds is abandoned, an unknown one is unknown
        assert engine.cancel("t2") == "removed"
        assert engine.cancel("t0") == "abandoned"
        assert engine.cancel("nope") == "unknown"
        assert {task_id: o.state for task_id, o in outcomes.items()} == {
            "t2": "cancelled", "t0": "cancelled"}
        # and a draining agent gets back the job that never reached Parsl
        assert [job.task_id for job, _ in engine.take_waiting()] == ["t3"]
    finally:
        engine.shutdown()


def shout_square(x: int) -> int:
    print(f"x={x}")
    return x * x


def square_or_die(x: int, die: bool) -> int:
    import os
    import signal

    if die:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


@pytest.fixture(scope="module")
def local_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An htex engine, used directly, on one local block of two workers (one retry after a
    lost worker), bundling up to 50 ms of work: ten quick jobs fit in one bundle even on a
    machine busy enough to make each run take 5 ms, and a 0.1 s run does not."""
    with _engine_on_a_local_block(tmp_path_factory.mktemp("htex"), bundle_seconds=0.05) as engine:
        yield engine


@contextmanager
def _engine_on_a_local_block(run_dir: Path, **options: Any) -> Iterator[Any]:
    from gc_agent.engines.htex import HtexEngine

    engine = HtexEngine(HtexEngineConfig(
        type="htex", max_workers_per_node=2, max_retries_on_system_failure=1, heartbeat_period=1,
        provider=LocalProviderConfig(init_blocks=1, min_blocks=1, max_blocks=1,
                                     worker_init=f"export PYTHONPATH={REPO_ROOT}"), **options),
        run_dir / "run")
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown()


def _run_on(engine: Any, jobs: list[Any], *, together: bool = False) -> dict[str, Any]:
    """Submit ``jobs`` to ``engine`` at once (``together``: as the agent submits a batch's);
    their outcomes, by task id, once all are in."""
    outcomes: dict[str, Any] = {}
    with engine.together() if together else nullcontext():
        for job in jobs:
            engine.submit(job, lambda outcome: outcomes.__setitem__(outcome.task_id, outcome))
    try:
        eventually(lambda: len(outcomes) == len(jobs), RESULT_TIMEOUT, f"{len(jobs)} outcomes")
    except AssertionError as exc:  # say which, and what the engine holds
        missing = [n for n, job in enumerate(jobs) if job.task_id not in outcomes]
        raise AssertionError(f"{exc}: none for jobs {missing}; engine {engine.status()}") from None
    return outcomes


def _sent(engine: Any) -> tuple[int, int]:
    """Jobs and Parsl tasks the engine has sent Parsl so far."""
    status = engine.status()
    return status["tasks_sent"], status["parsl_tasks_sent"]


def test_quick_jobs_share_parsl_tasks_each_keeping_its_own_value_and_output(
        local_engine: Any) -> None:
    from tests.unit.test_execution import a_job

    # Given a quick function the engine has run a few times (so it knows it is quick: a
    # worker's first run of it also imports this module)
    _run_on(local_engine, [a_job(shout_square, 0, function_id="shout") for _ in range(7)])
    sent_before = _sent(local_engine)

    # When 64 of its jobs arrive at once
    jobs = [a_job(shout_square, x, function_id="shout") for x in range(1, 65)]
    outcomes = _run_on(local_engine, jobs)

    # Then each has its own value and output
    assert all(outcomes[job.task_id].state == "success" for job in jobs)
    assert [CLOUDPICKLE.loads(outcomes[job.task_id].payload) for job in jobs] == [
        x * x for x in range(1, 65)]
    assert [outcomes[job.task_id].stdout for job in jobs] == [f"x={x}\n" for x in range(1, 65)]
    # and they travelled to Parsl several to a Parsl task
    tasks, parsl_tasks = (after - before for after, before in zip(_sent(local_engine), sent_before))
    assert tasks == 64 and parsl_tasks <= 20, (tasks, parsl_tasks)


def test_quick_jobs_that_arrive_together_reach_parsl_as_one_bundle(local_engine: Any) -> None:
    from tests.unit.test_execution import a_job

    # Given a quick function the engine has run a few times
    _run_on(local_engine, [a_job(shout_square, x, function_id="shout-together") for x in range(7)])
    sent_before = _sent(local_engine)

    # When ten of its jobs arrive together (one batch of tasks at the agent)
    jobs = [a_job(shout_square, x, function_id="shout-together") for x in range(10)]
    outcomes = _run_on(local_engine, jobs, together=True)

    # Then one Parsl task carried them all, and each has its own value
    assert tuple(after - before for after, before in zip(_sent(local_engine), sent_before)) == (10, 1)
    assert [CLOUDPICKLE.loads(outcomes[job.task_id].payload) for job in jobs] == [
        x * x for x in range(10)]


def test_quick_jobs_of_two_users_that_arrive_together_travel_in_a_bundle_each(
        local_engine: Any) -> None:
    from dataclasses import replace

    from tests.unit.test_execution import a_job

    # Given a quick function the engine has run a few times
    _run_on(local_engine, [a_job(shout_square, x, function_id="shout-users") for x in range(7)])
    sent_before = _sent(local_engine)

    # When three jobs of alice's and three of bob's arrive together
    jobs = [replace(a_job(shout_square, x, function_id="shout-users"), identity=user)
            for user in ("alice", "bob") for x in range(3)]
    _run_on(local_engine, jobs, together=True)

    # Then each user's travel in a Parsl task of their own
    assert tuple(after - before for after, before in zip(_sent(local_engine), sent_before)) == (6, 2)


def three_mebibytes(n: int) -> bytes:
    return bytes([n]) * 3 * 2**20


def test_jobs_of_a_bundle_whose_answers_grow_large_are_sent_again_and_answered_once(
        tmp_path: Path) -> None:
    from tests.unit.test_execution import a_job

    # Given a function with large results, run a few times, on an engine that bundles all
    # four jobs below whatever their runs take (on a busy machine, 3 MiB take a while)
    with _engine_on_a_local_block(tmp_path, bundle_seconds=60) as engine:
        _run_on(engine, [a_job(three_mebibytes, 0, function_id="large") for _ in range(7)])
        sent_before = _sent(engine)

        # When four of its jobs arrive together: one bundle, whose worker stops past 8 MiB
        jobs = [a_job(three_mebibytes, n, function_id="large") for n in range(4)]
        answers: list[Any] = []
        with engine.together():
            for job in jobs:
                engine.submit(job, answers.append)
        eventually(lambda: len(answers) == len(jobs), RESULT_TIMEOUT, "four answers")
        time.sleep(0.5)  # (a second answer for any of them would come soon after)
        sent_after = _sent(engine)

    # Then each is answered once, with its own value, the last one sent again
    assert sorted(answer.task_id for answer in answers) == sorted(job.task_id for job in jobs)
    by_task = {answer.task_id: answer for answer in answers}
    assert [CLOUDPICKLE.loads(by_task[job.task_id].payload)[:1] for job in jobs] == [
        bytes([n]) for n in range(4)]
    tasks, _ = (after - before for after, before in zip(sent_after, sent_before))
    assert tasks > len(jobs)


def square_after(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x * x


def test_a_job_cancelled_inside_a_bundle_at_parsl_is_answered_once_and_its_mates_run(
        local_engine: Any) -> None:
    from tests.unit.test_execution import a_job

    # Given a bundle at Parsl whose first job takes a second (the function is quick so far)
    _run_on(local_engine, [a_job(square_after, x, 0, function_id="after") for x in range(7)])
    jobs = [a_job(square_after, x, 1.0 if x == 0 else 0, function_id="after") for x in range(5)]
    answers: list[Any] = []
    with local_engine.together():
        for job in jobs:
            local_engine.submit(job, answers.append)

    # When a job of it is cancelled while it is there
    assert local_engine.cancel(jobs[3].task_id) == "abandoned"

    # Then that job is answered cancelled, once, and its bundle-mates with their values
    eventually(lambda: len(answers) == len(jobs), RESULT_TIMEOUT, "five answers")
    time.sleep(0.5)  # (a second answer for the cancelled job would come with its mates')
    by_task = {outcome.task_id: outcome for outcome in answers}
    assert len(answers) == len(by_task) == len(jobs)
    assert by_task[jobs[3].task_id].state == "cancelled"
    assert {x: CLOUDPICKLE.loads(by_task[job.task_id].payload)
            for x, job in enumerate(jobs) if x != 3} == {0: 0, 1: 1, 2: 4, 4: 16}


def test_a_slow_function_s_jobs_each_travel_alone(local_engine: Any) -> None:
    from tests.unit.test_execution import a_job

    # Given a function whose run took longer than bundle_seconds (0.05)
    _run_on(local_engine, [a_job(time.sleep, 0.1, function_id="nap")])
    sent_before = _sent(local_engine)

    # When six of its jobs arrive at once, they reach Parsl one to a Parsl task
    outcomes = _run_on(local_engine, [a_job(time.sleep, 0.1, function_id="nap") for _ in range(6)])

    assert {outcome.state for outcome in outcomes.values()} == {"success"}
    assert tuple(after - before for after, before in zip(_sent(local_engine), sent_before)) == (6, 6)


def test_a_job_that_kills_its_worker_inside_a_bundle_fails_alone(
        local_engine: Any, caplog: pytest.LogCaptureFixture) -> None:
    from tests.unit.test_execution import a_job

    # Given a quick function the engine has run a few times
    _run_on(local_engine, [a_job(square_or_die, 0, False, function_id="or-die") for _ in range(7)])

    # When one of 40 jobs sent together kills its worker every time it runs
    jobs = [a_job(square_or_die, x, x == 30, function_id="or-die") for x in range(40)]
    outcomes = _run_on(local_engine, jobs)

    # Then its bundle was split, and it alone fails, after its one retry
    assert "each runs again alone" in caplog.text
    poison = outcomes[jobs[30].task_id]
    assert poison.state == "failed" and poison.error.type == "WorkerLost"
    assert "lost with its worker 2 times" in poison.error.message
    # and every other job has its value
    assert {x: CLOUDPICKLE.loads(outcomes[job.task_id].payload)
            for x, job in enumerate(jobs) if x != 30} == {x: x * x for x in range(40) if x != 30}


def test_the_interchange_binds_only_the_configured_address_and_encrypts_by_default(
        tmp_path: Path) -> None:
    from gc_agent.engines.htex import HtexEngine

    # Given an engine with the default config but for a block-less provider
    config = HtexEngineConfig(type="htex", address="127.0.0.1", provider=LocalProviderConfig(
        init_blocks=0, min_blocks=0, max_blocks=1))
    engine = HtexEngine(config, tmp_path / "run")
    engine.start()
    try:
        # Then its interchange listens on 127.0.0.1 only
        interchange = next(pid for pid in _children(os.getpid())
                           if "interchange" in _command(pid).lower())
        addresses = _listening_addresses(interchange)
        assert addresses and addresses <= {"127.0.0.1"}, addresses
        # and CurveZMQ is on: the interchange's keys exist, private to the agent's user
        certificates = tmp_path / "run" / config.label / "certificates"
        assert (certificates / "server.key_secret").exists()
        assert certificates.stat().st_mode & 0o077 == 0
    finally:
        engine.shutdown()
    assert config.encrypted is True


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                found.append(int(entry.name))
    return found


def _command(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _listening_addresses(pid: int) -> set[str]:
    """Addresses ``pid`` listens on, from its socket inodes and /proc/net/tcp{,6}; an
    IPv4-mapped IPv6 address (ZeroMQ binds those) as its IPv4 form."""
    inodes = {link.split("[")[1].rstrip("]") for fd in Path(f"/proc/{pid}/fd").iterdir()
              if (link := os.readlink(fd)).startswith("socket:[")}
    addresses = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                packed = fields[1].split(":")[0]
                if len(packed) == 32 and not packed.startswith("0000000000000000FFFF0000"):
                    addresses.add(f"ipv6 {packed}")
                    continue
                addresses.add(".".join(str(b) for b in bytes.fromhex(packed[-8:])[::-1]))
    return addresses


def _parent_command(pid: int) -> str:
    """The command line of ``pid``'s parent process."""
    status = Path(f"/proc/{pid}/status").read_text()
    ppid = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
    return Path(f"/proc/{ppid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def whoami_in_pool() -> dict[str, Any]:
    import os
    from pathlib import Path

    status = Path(f"/proc/{os.getppid()}/status").read_text()
    return {"uid": os.getuid(), "pool_uid": int(status.split("\nUid:")[1].split()[0]),
            "pool": Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace")}


def test_a_multi_user_endpoint_gives_each_user_a_local_htex_engine_of_their_own(
        fabric: Fabric, accounts: dict[str, pwd.struct_passwd], tmp_path: Path) -> None:  # noqa: F811
    from gc_agent.config import IdentityRule, MultiUserConfig

    # Given a multi-user endpoint whose template gives each user htex on a local block
    (tmp_path / "user.yaml.j2").write_text(
        "type: htex\nmax_workers_per_node: 1\n"
        "provider: {type: local, init_blocks: 1, min_blocks: 0, max_blocks: 1}\n")
    bob = accounts["bob"]
    ep = fabric.configure_endpoint(f"mu-htex-{uuid.uuid4().hex[:6]}", multi_user=MultiUserConfig(
        identity_mapping=[IdentityRule(match=r"bob@uni\.edu", output=bob.pw_name)],
        user_config_template=tmp_path / "user.yaml.j2", worker_python=USER_PYTHON,
        # The open stack cannot tell who sent a task: this one-person test box opts out.
        insecure_trust_claimed_identities=True))
    ep.start()
    try:
        # When bob runs a task
        with Client(broker_url=fabric.broker_url, registry_url=fabric.registry_url,
                    home=str(fabric.home), identity="bob@uni.edu") as client, \
                Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
            seen = ex.submit(whoami_in_pool).result(timeout=RESULT_TIMEOUT)
    finally:
        ep.stop_all()

    # Then it ran as bob, in a worker pool of bob's, which bob's own engine started
    assert seen["uid"] == seen["pool_uid"] == bob.pw_uid
    assert "process_worker_pool" in seen["pool"]
    assert (Path(bob.pw_dir) / ".gc-fabric" / "htex").is_dir()
