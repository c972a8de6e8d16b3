"""A podman image for the container tests, built here from Debian's packages and cached.

No registry is reachable, so the image is a ``mmdebstrap`` root file system (Debian 12
with ``python3``) imported into podman's local store, with a marker file tasks read to
prove they ran inside. gc-fabric itself is not installed in it: the tests mount this
checkout (and its venv's packages) and put them on ``PYTHONPATH``. podman runs with runc
and lower default ulimits (``containers.conf`` named by ``CONTAINERS_CONF``): on this kind
of machine crun refuses hybrid cgroups and cannot raise ``RLIMIT_NOFILE`` to podman's default.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The image; bump the tag when its contents change.
IMAGE = "localhost/gc-fabric-test-debian:bookworm-2"
#: The marker file inside the image, and what it holds.
MARKER_PATH = "/etc/gc-fabric-test-image"
MARKER = "gc-fabric test image"
#: Debian packages of the image: a Python of the agent's minor version, and the C++ runtime
#: pyzmq (Parsl's worker pool) needs.
PACKAGES = "python3,libstdc++6"
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
"""


def ensure_podman() -> None:
    """podman, runc, catatonit and mmdebstrap, installed by deploy/ensure-test-tools.sh if
    missing."""
    tools = ("podman", "runc", "catatonit", "mmdebstrap")
    if all(shutil.which(tool) for tool in tools):
        return
    done = subprocess.run(["bash", str(ROOT / "deploy" / "ensure-test-tools.sh")],
                          capture_output=True, text=True, timeout=900, check=False)
    if not all(shutil.which(tool) for tool in tools):
        message = f"{', '.join(tools)}: some missing and not installable: {done.stderr[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def containers_conf(directory: Path) -> Path:
    """Write the containers.conf podman needs here; name it in ``CONTAINERS_CONF``."""
    path = directory / "containers.conf"
    path.write_text(CONTAINERS_CONF)
    return path


def ensure_image(environment: dict[str, str]) -> str:
    """The test image's name, built first if podman's store lacks it (~35 s, once)."""
    exists = subprocess.run(["podman", "image", "exists", IMAGE], env=environment, check=False)
    if exists.returncode == 0:
        return IMAGE
    with tempfile.TemporaryDirectory(prefix="gc-image-") as work:
        rootfs = Path(work) / "rootfs.tar"
        subprocess.run(["mmdebstrap", "--quiet", "--variant=essential", f"--include={PACKAGES}",
                        f"--customize-hook=echo '{MARKER}' > \"$1{MARKER_PATH}\"",
                        "bookworm", str(rootfs)], check=True, timeout=600, env=environment)
        subprocess.run(["podman", "import", "--quiet", str(rootfs), IMAGE], check=True,
                       timeout=300, env=environment, stdout=subprocess.DEVNULL)
    return IMAGE


def mount_fabric_options() -> str:
    """container_cmd_options that make this checkout's gc-fabric importable in the image."""
    paths = [str(ROOT), *site.getsitepackages()]
    mounts = " ".join(f"-v {path}:{path}:ro" for path in dict.fromkeys(paths))
    return f"{mounts} -e PYTHONPATH={':'.join(paths)}"
