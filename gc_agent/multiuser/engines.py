"""The engine of a multi-user endpoint: one process pool per account, started on demand.

The root agent keeps the AMQP side (its broker credentials never reach user code). Each
task is mapped to a local account, its options are checked against the administrator's
schema, and it runs in that account's own worker processes — started with initgroups,
setgid and setuid, a clean environment and the account's home. A template that renders an
htex engine gets the user an engine process of their own, as that account, whose
interchange and batch jobs are theirs (``gc_agent.multiuser.remote``). Engines idle longer
than ``user_idle_timeout`` are stopped and come back with the next task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gc_agent.config import EngineConfig, HtexEngineConfig, MultiUserConfig
from gc_agent.engines.base import CancelResult, Engine, OnDone
from gc_agent.engines.processes import Account, ProcessEngine, WorkerLaunch
from gc_agent.execution import Job, Outcome
from gc_agent.multiuser.mapping import lookup_account, map_identity
from gc_agent.multiuser.remote import RemoteEngine
from gc_agent.multiuser.templates import render_user_engine, template_problem
from gc_core.errors import ConfigError, GCError
from gc_core.protocol import ErrorInfo

__all__ = ["UserEngines"]

logger = logging.getLogger(__name__)

#: Seconds between checks for idle user pools.
REAP_INTERVAL = 1.0


class UserEngines(Engine):
    """Dispatches each job to the worker pool of the account its identity maps to."""

    name = "multi-user"

    def __init__(self, config: MultiUserConfig, *, nominal_capacity: int) -> None:
        self._config = config
        self._nominal_capacity = nominal_capacity
        self._template = ""
        self._schema: dict[str, Any] = {}
        self._pools: dict[tuple[str, str], Engine] = {}
        self._last_used: dict[tuple[str, str], float] = {}
        self._owner: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def capacity(self) -> int:
        return self._nominal_capacity

    @property
    def busy(self) -> int:
        return sum(pool.busy for pool in list(self._pools.values()))

    def status(self) -> dict[str, Any]:
        """The status each user's engine reports (their htex engines' blocks and workers)."""
        with self._lock:
            pools = list(self._pools.items())
        engines = [{"account": account, "engine": pool.name, **status}
                   for (account, _config), pool in pools if (status := pool.status())]
        return {"user_engines": engines} if engines else {}

    def start(self) -> None:
        """Read the administrator's template and schema; start the idle reaper.

        Raises:
            ConfigError: a file is missing or the schema is not JSON.
        """
        try:
            self._template = Path(self._config.user_config_template).read_text()
            if self._config.user_config_schema is not None:
                self._schema = json.loads(Path(self._config.user_config_schema).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the multi-user template or schema: {exc}") from exc
        problem = template_problem(self._template, self._schema)
        if problem is not None:
            logger.warning("%s (tried with the schema's defaults and no option: until the "
                           "template is mended, a user's task that gives no option fails "
                           "with this)", problem)
        threading.Thread(target=self._reap_idle, name="user-pool-reaper", daemon=True).start()

    def submit(self, job: Job, on_done: OnDone) -> None:
        try:
            key, pool = self._pool_for(job)
        except GCError as exc:
            on_done(Outcome(job.task_id, "failed",
                            error=ErrorInfo(type=type(exc).__name__, message=str(exc))))
            return

        def done(outcome: Outcome) -> None:
            with self._lock:
                self._owner.pop(job.task_id, None)
                self._last_used[key] = time.monotonic()
            on_done(outcome)

        with self._lock:
            self._owner[job.task_id] = key
        pool.submit(job, done)

    def cancel(self, task_id: str) -> CancelResult:
        with self._lock:
            key = self._owner.get(task_id)
            pool = self._pools.get(key) if key else None
        return pool.cancel(task_id) if pool is not None else "unknown"

    def take_waiting(self) -> list[tuple[Job, OnDone]]:
        return [item for pool in list(self._pools.values()) for item in pool.take_waiting()]

    def shutdown(self) -> None:
        self._stopping.set()
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown()

    def _pool_for(self, job: Job) -> tuple[tuple[str, str], Engine]:
        account = lookup_account(
            map_identity(job.identity, self._config.identity_mapping,
                         self._config.identity_mapping_command), job.identity,
            allowed=frozenset(self._config.allowed_privileged_accounts))
        engine = render_user_engine(self._template, self._schema, job.user_options,
                                    account=account.name)
        key = (account.name, engine.model_dump_json())
        with self._lock:
            pool = self._pools.get(key)
            if pool is None or (isinstance(pool, RemoteEngine) and not pool.alive):
                pool = self._start_engine(engine, account)
                self._pools[key] = pool
            self._last_used[key] = time.monotonic()
        return key, pool

    def _start_engine(self, engine: EngineConfig | HtexEngineConfig, account: Account) -> Engine:
        launch = WorkerLaunch(python=self._config.worker_python or sys.executable,
                              account=account)
        pool: Engine
        if isinstance(engine, HtexEngineConfig):
            # One run directory per distinct config: Parsl rewrites its keys and logs there.
            digest = hashlib.sha256(engine.model_dump_json().encode()).hexdigest()[:8]
            pool = RemoteEngine(engine, launch, name=f"{account.name}-{digest}")
        else:
            pool = ProcessEngine(engine.max_workers, launch, devices=engine.available_accelerators)
        try:
            pool.start()
        except (OSError, subprocess.SubprocessError) as exc:
            pool.shutdown()
            raise ConfigError(f"could not start workers as {account.name} ({exc}); the "
                              "endpoint's administrator should check that account's home "
                              "and that it can run worker_python") from None
        logger.info("started a %s engine for %s (uid %d): up to %d workers", pool.name,
                    account.name, account.uid, pool.capacity)
        return pool

    def _reap_idle(self) -> None:
        while not self._stopping.wait(REAP_INTERVAL):
            now = time.monotonic()
            with self._lock:
                idle = [key for key, pool in self._pools.items()
                        if pool.busy == 0 and key not in self._owner.values()
                        and now - self._last_used.get(key, now) > self._config.user_idle_timeout]
                stopping = [self._pools.pop(key) for key in idle]
            for key, pool in zip(idle, stopping):
                logger.info("stopping the idle workers of %s", key[0])
                pool.shutdown()
