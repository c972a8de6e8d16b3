"""A Parsl worker pool whose workers are threads: many simulated workers on a small machine.

Run exactly as Parsl's ``process_worker_pool.py`` (same arguments; the benchmark puts a
script of that name first on the pool's PATH). The manager is Parsl's own — registration,
heartbeats, task and result traffic with the interchange are unchanged, and it reports
every slot of ``--max_workers_per_node`` — but each worker is a thread of this process
instead of a spawned Python process, so 1,000 of them fit in one process's memory. A thread
runs each task as Parsl's worker does (the context's ``task_executor`` or ``execute_task``,
results pickled the same way): it really runs the agent's job, in this process, under the
GIL.

What it measures is the agent, the interchange and the manager with that many slots to
feed, not 1,000 CPUs: on two cores the tasks must be no-ops.
"""

from __future__ import annotations

import importlib
import pickle
import queue
import sys
import threading
from typing import Any

from parsl.app.errors import RemoteExceptionWrapper
from parsl.executors.execute_task import execute_task
from parsl.executors.high_throughput.process_worker_pool import Manager, get_arg_parser
from parsl.serialize import serialize

#: Results larger than this go as a separate buffer (Parsl's worker uses the same).
BUFFER_THRESHOLD = 1_000_000


def run_request(request: dict[str, Any]) -> bytes:
    """Run one task the interchange sent and return its pickled result package."""
    task_id = request["task_id"]
    try:
        result = serialize(run_buffer(request), buffer_threshold=BUFFER_THRESHOLD)
        package = {"type": "result", "task_id": task_id, "result": result}
    except Exception:  # noqa: BLE001 - the task's failure goes back as its result, as Parsl's worker does
        package = {"type": "result", "task_id": task_id,
                   "exception": serialize(RemoteExceptionWrapper(*sys.exc_info()))}
    return pickle.dumps(package)


def run_buffer(request: dict[str, Any]) -> Any:
    """Run a task's buffer as Parsl's worker does: with the context's ``task_executor`` (the
    htex engine's), else with Parsl's ``execute_task``."""
    named = request.get("context", {}).get("task_executor")
    if not named:
        return execute_task(request["buffer"])
    module, _, name = named["f"].rpartition(".")
    run = getattr(importlib.import_module(module), name)
    return run(request["buffer"], *named.get("a", ()), **named.get("k", {}))


class SlotThread(threading.Thread):
    """One simulated worker, answering what the manager's watchdog and shutdown ask of a
    worker process (``is_alive``, ``terminate``, ``join``, ``exitcode``, ``kill``, ``close``)."""

    def __init__(self, manager: Manager, worker_id: int) -> None:
        super().__init__(name=f"simulated-worker-{worker_id}", daemon=True)
        self._manager = manager
        self._stopping = threading.Event()

    def run(self) -> None:
        manager = self._manager
        ready = manager.ready_worker_count
        with ready.get_lock():
            ready.value += 1
        while not self._stopping.is_set():
            try:  # as long a wait as Parsl's workers: a thread per slot wakes rarely
                request = manager.pending_task_queue.get(timeout=manager.heartbeat_period)
            except queue.Empty:
                continue
            with ready.get_lock():
                ready.value -= 1
            manager.pending_result_queue.put(run_request(request))
            with ready.get_lock():
                ready.value += 1

    def terminate(self) -> None:
        """Stop after the task at hand; the thread is a daemon, so the pool's exit ends it."""
        self._stopping.set()

    kill = terminate

    @property
    def exitcode(self) -> int | None:
        """0 once stopping (the manager's shutdown then moves on), else None while running."""
        return 0 if self._stopping.is_set() or not self.is_alive() else None

    def close(self) -> None:
        """Nothing to release: a process would free its handle here."""


class SimulatedManager(Manager):
    """Parsl's manager with a thread per worker slot, and every slot it was asked for."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Parsl caps the slots at the cores; threads cost no core while they wait
        self.worker_count = self.max_workers_per_node

    def _start_worker(self, worker_id: int) -> SlotThread:  # type: ignore[override]
        slot = SlotThread(self, worker_id)
        slot.start()
        return slot


def main(argv: list[str] | None = None) -> None:
    """Parse Parsl's pool arguments and run the simulated manager until the interchange stops it."""
    args = get_arg_parser().parse_args(argv)
    manager = SimulatedManager(
        addresses=args.addresses, address_probe_timeout=int(args.address_probe_timeout),
        port=args.port, uid=args.uid, block_id=args.block_id,
        cores_per_worker=float(args.cores_per_worker), mem_per_worker=None,
        max_workers_per_node=int(args.max_workers_per_node),
        prefetch_capacity=int(args.prefetch_capacity),
        heartbeat_threshold=int(args.hb_threshold), heartbeat_period=int(args.hb_period),
        drain_period=None if args.drain_period in (None, "None") else int(args.drain_period),
        poll_period=int(args.poll), cpu_affinity=args.cpu_affinity,
        available_accelerators=args.available_accelerators,
        cert_dir=None if args.cert_dir == "None" else args.cert_dir, log_config=None)
    manager.start()


if __name__ == "__main__":
    main()
