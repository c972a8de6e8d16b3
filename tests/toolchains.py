"""The other-language toolchains some tests run for real: Node.js with npm packages, and Go.

``deploy/ensure-test-tools.sh`` installs them (apt for the toolchains, npm into a cache
outside the repository); a test that needs one calls it first only if something is
missing, and skips (fails in CI) when it still is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The script that installs every test tool; idempotent and quiet when all is there.
ENSURE_SCRIPT = ROOT / "deploy" / "ensure-test-tools.sh"
#: Where Debian's Go packages keep their sources (GOPATH mode, no module downloads).
DEBIAN_GOPATH = Path("/usr/share/gocode")
#: The npm packages the tests require, as the script pins them.
NPM_PACKAGES = ("amqplib", "@asyncapi/parser")


def tools_cache() -> Path:
    """Where the script puts npm packages (its ``GC_TOOLS_CACHE`` default)."""
    explicit = os.environ.get("GC_TOOLS_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gc-fabric"


def node_modules() -> Path:
    """The ``node_modules`` holding the pinned npm packages, installed if missing."""
    modules = tools_cache() / "node" / "node_modules"
    _ensure(lambda: shutil.which("node") is not None and all(
        (modules / name / "package.json").is_file() for name in NPM_PACKAGES),
        "Node.js and the npm packages " + ", ".join(NPM_PACKAGES))
    return modules


def go_environment() -> dict[str, str]:
    """The environment in which ``go build`` finds Debian's amqp091-go, installed if missing."""
    _ensure(lambda: shutil.which("go") is not None
            and (DEBIAN_GOPATH / "src/github.com/rabbitmq/amqp091-go").is_dir(),
            "Go and golang-github-rabbitmq-amqp091-go-dev")
    return {**os.environ, "GO111MODULE": "off", "GOPATH": str(DEBIAN_GOPATH),
            "GOCACHE": str(tools_cache() / "go-build")}


def _ensure(present: Callable[[], bool], what: str) -> None:
    if present():
        return
    done = subprocess.run(["bash", str(ENSURE_SCRIPT)], capture_output=True, text=True,
                          timeout=900, check=False)
    if present():
        return
    message = (f"{what} missing and {ENSURE_SCRIPT.name} could not install them "
               f"(exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
