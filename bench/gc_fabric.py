"""gc-fabric under the benchmark: the Executor against a real registry and agent.

Each system brings up the whole embedded stack in its own vhost — the registry (with its
task ledger on SQLite) and one agent — as subprocesses, exactly as a user runs them, and
drives it from this process through ``gc_client.Executor``. The ledger stays on: it is
part of what gc-fabric promises (results survive the client), so its cost is measured.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import wait
from pathlib import Path
from typing import Any

from bench.cpu import ProcessRoot
from bench.harness import TASK_TIMEOUT_S, System, throughput_timeout
from bench.peers import _process
from bench.peers._amqp import create_vhost, delete_vhost, vhost_url

logger = logging.getLogger(__name__)

#: Seconds to wait for the registry or the agent to come up.
START_TIMEOUT_S = 60.0


def noop() -> None:
    """The benchmark's task: nothing at all."""


class GcFabricSystem(System):
    """The Executor with a thread, process or htex engine of ``workers`` workers.

    The htex engine gets one local block of ``workers`` workers and keeps its defaults
    (CurveZMQ on); its rows are named ``gc-fabric-htex-<workers>w``, to sit beside
    ``parsl-htex-<workers>w``. With ``simulated`` its pool is ``bench.sim_pool`` (a thread
    per worker), named ``gc-fabric-htex-sim-<workers>w``.
    """

    def __init__(self, engine: str, workers: int = 2, ledger: bool = True,
                 simulated: bool = False) -> None:
        if simulated and engine != "htex":
            raise ValueError("simulated workers exist for the htex engine only")
        self.engine = engine
        self.workers = workers
        self.ledger = ledger
        self.simulated = simulated
        self.name = f"gc-fabric-{engine}" + ("-sim" if simulated else "") \
            + (f"-{workers}w" if engine == "htex" else "") + ("" if ledger else "-no-ledger")
        self._processes: list[subprocess.Popen[bytes]] = []
        self._vhost: str | None = None
        self._home = Path(tempfile.mkdtemp(prefix="gc-bench-"))
        self._executor: Any = None  # a gc_client.Executor once started (imported in start())
        #: The environment start() gave the registry and agent, for start_agent().
        self._env: dict[str, str] = {}
        self._agent_args: list[str] = []

    def start(self) -> None:
        from gc_client import Client, Executor

        self._vhost = create_vhost("gc")
        broker_url = vhost_url(self._vhost)
        port = _free_port()
        env = {"GC_HOME": str(self._home), "GC_BROKER_URL": broker_url,
               "GC_REGISTRY_URL": f"http://127.0.0.1:{port}"}
        self._env = env
        registry = [sys.executable, "-m", "gc_core.registry.cli", "serve", "--auth", "open",
                    "--port", str(port), "--log-level", "WARNING"] + ([] if self.ledger else ["--no-ledger"])
        self._processes.append(_process.start_worker(registry, self._home / "registry.log", env))
        _wait_for_registry(env["GC_REGISTRY_URL"])
        local_engine = "processes" if self.engine == "htex" else self.engine
        subprocess.run([sys.executable, "-m", "gc_agent.cli", "configure", "bench", "--engine",
                        local_engine, "--workers", str(self.workers)],
                       env=_process.worker_env(env), check=True, capture_output=True)
        if self.engine == "htex":
            _use_htex(self._home / "endpoints" / "bench" / "config.yaml", self.workers,
                      _simulated_pool_bin(self._home) if self.simulated else None)
        agent = [sys.executable, "-m", "gc_agent.cli", "start", "bench", "--log-level", "WARNING"]
        self._processes.append(_process.start_worker(agent, self._home / "agent.log", env))
        pid_file = self._home / "endpoints" / "bench" / "agent.pid"
        _wait_for(pid_file.exists, "the agent to start")
        endpoint_id = _endpoint_id(self._home / "endpoints" / "bench" / "config.yaml")
        client = Client(broker_url=broker_url, registry_url=env["GC_REGISTRY_URL"],
                        home=str(self._home))
        self._executor = Executor(endpoint_id=endpoint_id, client=client)

    def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor.client.close()
            self._executor = None
        for process in reversed(self._processes):
            _process.stop_worker(process)
        self._processes.clear()
        if self._vhost is not None:
            delete_vhost(self._vhost)
            self._vhost = None

    def run_throughput(self, n: int) -> float:
        assert self._executor is not None
        start = time.perf_counter()
        futures = [self._executor.submit(noop) for _ in range(n)]
        done, pending = wait(futures, timeout=throughput_timeout(n))
        if pending:
            raise TimeoutError(f"{len(pending)} of {n} tasks unfinished")
        elapsed = time.perf_counter() - start
        for future in done:
            future.result()
        return elapsed

    def run_latency(self, n: int) -> list[float]:
        assert self._executor is not None
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            self._executor.submit(noop).result(timeout=TASK_TIMEOUT_S)
            samples.append(time.perf_counter() - start)
        return samples

    def processes(self) -> list[ProcessRoot]:
        """The registry; the agent, whose children are its workers (its interchange counts
        as itself); and htex worker pools, found by the run directory under our home."""
        registry, agent = self._processes
        return [ProcessRoot("registry", pid=registry.pid),
                ProcessRoot("agent", pid=agent.pid, descendants_role="workers"),
                ProcessRoot("workers", cmdline=str(self._home))]

    # -- used by bench.memory: pids, and the agent stopped and started on its own ----------

    @property
    def executor(self) -> Any:
        """The gc_client.Executor start() connected to the endpoint."""
        assert self._executor is not None, "start() first"
        return self._executor

    def pids(self) -> dict[str, int]:
        """Return the pids of the registry and the agent (while both run)."""
        registry, agent = self._processes
        return {"registry": registry.pid, "agent": agent.pid}

    def stop_agent(self) -> None:
        """Stop the agent alone; tasks sent meanwhile wait in the endpoint's queue."""
        agent = self._processes.pop()
        _process.stop_worker(agent)
        self._agent_args = [str(arg) for arg in agent.args]  # type: ignore[union-attr]

    def start_agent(self) -> None:
        """Start the agent stopped by stop_agent() again, as start() did."""
        pid_file = self._home / "endpoints" / "bench" / "agent.pid"
        self._processes.append(_process.start_worker(self._agent_args, self._home / "agent.log",
                                                     self._env))
        _wait_for(pid_file.exists, "the agent to start")

    def unconfirmed_tasks(self) -> int:
        """How many tasks submitted so far the broker has not confirmed (taken into the
        endpoint's queue) yet. (The queue's message count says nothing here: one message
        may carry a batch of tasks.)"""
        assert self._executor is not None
        return len(self._executor._group.unconfirmed())


def _use_htex(path: Path, workers: int, pool_bin: Path | None = None) -> None:
    """Give the configured endpoint the htex engine: one local block of ``workers`` workers
    (started from ``pool_bin`` first on PATH, if given)."""
    from gc_agent.config import HtexEngineConfig, load_config, save_config
    from gc_agent.providers import LocalProviderConfig

    pythonpath = shlex.quote(_process.worker_env()["PYTHONPATH"])  # the pool unpickles noop
    worker_init = f"export PYTHONPATH={pythonpath}" + (
        f"; export PATH={shlex.quote(str(pool_bin))}:$PATH" if pool_bin else "")
    engine = HtexEngineConfig(type="htex", max_workers_per_node=workers, provider=LocalProviderConfig(
        init_blocks=1, min_blocks=1, max_blocks=1, worker_init=worker_init))
    save_config(load_config(path).model_copy(update={"engine": engine}), path)


def _simulated_pool_bin(home: Path) -> Path:
    """A directory whose ``process_worker_pool.py`` (the name Parsl launches pools by) runs
    ``bench.sim_pool`` with the same arguments."""
    directory = home / "sim-pool-bin"
    directory.mkdir(exist_ok=True)
    script = directory / "process_worker_pool.py"
    script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m bench.sim_pool "$@"\n')
    script.chmod(0o755)
    return directory


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _wait_for_registry(url: str) -> None:
    import httpx

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    _wait_for(up, "the registry to start")


def _endpoint_id(config: Path) -> str:
    import yaml

    return str(yaml.safe_load(config.read_text())["endpoint_id"])
