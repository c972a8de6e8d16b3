"""Parsl peer: HighThroughputExecutor on a LocalProvider, one block of workers, over ZeroMQ.

Parsl starts its own interchange and worker pool as subprocesses; ``stop()`` has the
DataFlowKernel shut them down. The run directory lives under a temporary directory.
"""

from __future__ import annotations

import logging
import shlex
import sys
import tempfile
from concurrent.futures import Future
from pathlib import Path

import parsl
from parsl.config import Config
from parsl.dataflow.dflow import DataFlowKernel
from parsl.executors import HighThroughputExecutor
from parsl.providers import LocalProvider

from bench.cpu import ProcessRoot
from bench.harness import TASK_TIMEOUT_S, System, time_round_trips, time_sweep
from bench.peers._process import worker_env

logger = logging.getLogger(__name__)

#: Workers in the single worker pool, unless the system is built with another count.
PARSL_WORKERS = 2


@parsl.python_app
def noop() -> None:
    """Do nothing: the benchmark measures the system, not the task."""


def make_config(run_dir: Path, workers: int = PARSL_WORKERS, encrypted: bool = False) -> Config:
    """Build a Parsl config: HTEX on loopback, one local block of ``workers`` workers."""
    # Parsl finds interchange.py and process_worker_pool.py on PATH, which lacks an
    # unactivated venv's scripts: name the first in full, put them on the pool's PATH.
    # The pool unpickles ``noop`` by reference, so it needs the repo on PYTHONPATH too.
    bin_dir = Path(sys.executable).parent
    pool_env = worker_env()
    provider = LocalProvider(  # type: ignore[no-untyped-call]
        init_blocks=1,
        min_blocks=1,
        max_blocks=1,
        worker_init=(
            f"export PATH={shlex.quote(pool_env['PATH'])}; "
            f"export PYTHONPATH={shlex.quote(pool_env['PYTHONPATH'])}"
        ),
    )
    executor = HighThroughputExecutor(
        label="htex",
        address="127.0.0.1",
        interchange_launch_cmd=[sys.executable, str(bin_dir / "interchange.py")],
        max_workers_per_node=workers,
        # plain ZeroMQ by default, like the plain AMQP every other peer uses on loopback;
        # CurveZMQ (Parsl's default, and the htex engine's) costs ~10-15% of throughput here
        encrypted=encrypted,
        provider=provider,
    )
    return Config(
        executors=[executor],
        run_dir=str(run_dir),
        strategy="none",
        usage_tracking=0,
        # no DEBUG parsl.log: writing it costs the submitting process ~30% of its rate;
        # Parsl's loggers then follow the CLI's configuration like every other library's
        initialize_logging=False,
    )


class ParslHtexSystem(System):
    """Parsl's DataFlowKernel in this process; interchange and workers as its subprocesses.

    Built with ``workers`` and ``encrypted`` it is named ``parsl-htex-<workers>w``: the row
    gc-fabric's htex engine with as many workers (CurveZMQ on, its default) is compared to.
    """

    uses_rabbitmq = False

    def __init__(self, workers: int | None = None, encrypted: bool = False) -> None:
        self.workers = workers or PARSL_WORKERS
        self.encrypted = encrypted
        self.name = "parsl-htex" if workers is None else f"parsl-htex-{workers}w"
        self._dfk: DataFlowKernel | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> None:
        """Load the Parsl config, which starts the interchange and the worker pool."""
        self._workdir = tempfile.TemporaryDirectory(prefix="bench-parsl-")
        self._dfk = parsl.load(make_config(Path(self._workdir.name) / "runinfo", self.workers,
                                           self.encrypted))

    def stop(self) -> None:
        """Shut down the DataFlowKernel and its subprocesses, then remove the run directory."""
        try:
            if self._dfk is not None:
                self._dfk.cleanup()
        finally:
            self._dfk = None
            parsl.clear()
            if self._workdir is not None:
                self._workdir.cleanup()
                self._workdir = None

    def run_throughput(self, n: int) -> float:
        """Submit ``n`` apps, then wait for every result."""
        def wait(future: Future[None], left: float) -> None:
            future.result(timeout=left)

        return time_sweep(n, noop, wait)

    def run_latency(self, n: int) -> list[float]:
        """Run ``n`` apps one at a time."""
        return time_round_trips(n, lambda: noop().result(timeout=TASK_TIMEOUT_S))

    def processes(self) -> list[ProcessRoot]:
        """The worker pool, found by its run directory (its launcher's shell has left it
        behind); the interchange is this process's child and counts as itself."""
        assert self._workdir is not None, "start() first"
        return [ProcessRoot("workers", cmdline=self._workdir.name)]
