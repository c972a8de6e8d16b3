"""A real single-node Slurm for the scheduler tests, started by ../shared/slurm/start-slurm.sh.

The script installs and starts Slurm if it must (it is idempotent and takes ~0.05 s when
Slurm is already up). These tests are skipped only when the script itself says it cannot
run, with its ERROR line as the reason; Slurm is left running for the next session.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Where start-slurm.sh may be: named by the environment, shared beside the repository, or
#: the copy in this folder (so a checkout anywhere, such as CI's, has one).
_CANDIDATES = [Path(p) for p in [os.environ.get("GC_SLURM_START", "")] if p] + [
    Path(__file__).resolve().parents[3] / "shared" / "slurm" / "start-slurm.sh",
    Path(__file__).resolve().parent / "slurm" / "start-slurm.sh",
]
START_SLURM = next((path for path in _CANDIDATES if path.exists()), _CANDIDATES[-1])
#: Seconds start-slurm.sh may take on a fresh machine (apt-get install included).
START_TIMEOUT = 600


@dataclass(frozen=True)
class Slurm:
    """A running Slurm: its partition and config file."""

    partition: str
    conf: str

    def jobs(self, name_prefix: str) -> dict[str, str]:
        """Our jobs still known to squeue (job id -> state), by job-name prefix."""
        done = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True,
                              text=True, check=True, timeout=30)
        rows = (line.split() for line in done.stdout.splitlines() if line.strip())
        return {job_id: state for job_id, name, state in rows if name.startswith(name_prefix)}

    def cancel(self, *job_ids: str) -> None:
        subprocess.run(["scancel", *job_ids], check=True, timeout=30)


@pytest.fixture(scope="session")
def slurm() -> Iterator[Slurm]:
    """Slurm up, or the whole folder skipped with the start script's own ERROR line."""
    if not START_SLURM.exists():
        pytest.skip(f"{START_SLURM} is missing")
    try:
        done = subprocess.run(["bash", str(START_SLURM)], capture_output=True, text=True,
                              timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.skip(f"start-slurm.sh did not finish within {START_TIMEOUT}s")
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        reason = next((line for line in lines if "ERROR" in line), lines[-1] if lines else "")
        pytest.skip(f"Slurm could not be started: {reason}")
    yield Slurm(partition="debug", conf=os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
