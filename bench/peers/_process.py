"""Start and stop worker subprocesses so that none outlives a benchmark run."""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

#: Seconds a worker gets to exit after SIGTERM before it is sent SIGKILL.
STOP_GRACE_S = 10.0
#: Repository root, the working directory of every worker so that ``bench`` is importable.
REPO_ROOT = Path(__file__).resolve().parents[2]


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return an environment for a worker: ours, the repo on PYTHONPATH, the venv on PATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def start_worker(
    args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``args`` in its own process group, stderr to ``log_path``, stdout as a pipe."""
    logger.info("starting worker: %s (log %s)", " ".join(args), log_path)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(args),
            cwd=REPO_ROOT,
            env=worker_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # own process group: SIGTERM reaches prefork children too
        )


#: Characters of a worker's log quoted in the error when it fails to start.
LOG_TAIL_CHARS = 600


def log_tail(log_path: Path | None) -> str:
    """Return the last LOG_TAIL_CHARS of a worker log, or "" if there is none."""
    if log_path is None or not log_path.exists():
        return ""
    return log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:].strip()


def wait_for_line(
    process: subprocess.Popen[bytes], marker: bytes, timeout_s: float, log_path: Path | None = None
) -> None:
    """Block until the worker prints a stdout line containing ``marker``.

    Raises:
        RuntimeError: if the worker exits first or ``timeout_s`` passes; quotes the log's tail.
    """
    try:
        _wait_for_line(process, marker, timeout_s)
    except RuntimeError as exc:
        tail = log_tail(log_path)
        raise RuntimeError(f"{exc}; log: {tail}" if tail else str(exc)) from None


def _wait_for_line(process: subprocess.Popen[bytes], marker: bytes, timeout_s: float) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([process.stdout], [], [], remaining)
        if not ready:
            break
        line = process.stdout.readline()
        if marker in line:
            return
        if not line:
            raise RuntimeError(f"worker exited with code {process.wait(5)} before it was ready")
    raise RuntimeError(f"worker not ready after {timeout_s:.0f}s")


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def stop_worker(process: subprocess.Popen[bytes] | None) -> None:
    """Terminate the worker's process group, escalating to SIGKILL after STOP_GRACE_S."""
    if process is None:
        return
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        logger.warning("worker %d ignored SIGTERM; killing it", process.pid)
        _signal_group(process, signal.SIGKILL)
        process.wait(STOP_GRACE_S)
    # the leader may be gone while children linger in its group: make sure they go too
    _signal_group(process, signal.SIGKILL)
    if process.stdout is not None:
        process.stdout.close()
