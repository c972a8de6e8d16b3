"""A report of the hardware a worker runs on: what ``get_worker_hardware_details`` runs there."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess

__all__ = ["hardware_report"]

#: Seconds each probing command may take.
PROBE_TIMEOUT = 10.0
#: Commands whose output describes the node, run when installed.
PROBES = (("CPU", ["lscpu"]), ("GPUs (NVIDIA)", ["nvidia-smi", "-L"]),
          ("GPUs (AMD)", ["rocm-smi", "--showproductname"]))
#: Variables that say which accelerators the worker may use.
DEVICE_VARIABLES = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")


def hardware_report(label: str = "worker") -> str:
    """Host, operating system, Python, CPUs, memory and accelerators of this machine, as text."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    lines = [f"{label} on {socket.gethostname()}",
             f"system: {platform.platform()}",
             f"python: {platform.python_version()} ({platform.python_implementation()})",
             f"cpus: {os.cpu_count()} (this worker may use {affinity or os.cpu_count()})",
             f"memory: {_total_memory()}"]
    lines += [f"{name}={os.environ[name]}" for name in DEVICE_VARIABLES if name in os.environ]
    for title, command in PROBES:
        output = _probe(command)
        if output:
            lines += ["", f"{title} ({' '.join(command)}):", output]
    return "\n".join(lines)


def _total_memory() -> str:
    """MemTotal from /proc/meminfo, or 'unknown' where there is none."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _probe(command: list[str]) -> str:
    """What ``command`` prints, or '' if it is not installed or fails."""
    if shutil.which(command[0]) is None:
        return ""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""
