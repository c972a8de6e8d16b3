"""Where to find the broker, the registry and local state: arguments, then env, then defaults."""

from __future__ import annotations

import getpass
import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from gc_core.errors import ConfigError

__all__ = [
    "AGENT_PREFIX",
    "CREDENTIALS_FILE",
    "DEFAULT_BROKER_URL",
    "DEFAULT_REGISTRY_URL",
    "REGISTRY_BROKER_USER",
    "FabricSettings",
    "read_credentials",
    "resolve_settings",
]

#: The demo's local broker (RabbitMQ's default guest account only works over loopback).
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
#: The demo's local registry (``gc-registry serve``).
DEFAULT_REGISTRY_URL = "http://127.0.0.1:8765"
#: An endpoint's agent logs in to a secured broker as this prefix plus the endpoint id, so
#: the broker-checked ``user_id`` of a result names the endpoint that sent it.
AGENT_PREFIX = "endpoint-"
#: The registry's own broker account: its ledger republishes dead letters to their
#: submitters and its action provider submits tasks for users, so agents and clients trust it.
REGISTRY_BROKER_USER = "gc-registry"
#: Where ``gc-client login`` keeps the token and the name it stands for, under ``$GC_HOME``.
CREDENTIALS_FILE = "credentials.json"


class FabricSettings(BaseModel):
    """How one process reaches the fabric."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    broker_url: str = DEFAULT_BROKER_URL
    registry_url: str = DEFAULT_REGISTRY_URL
    token: str | None = None
    home: Path = Path("~/.gc").expanduser()
    user: str = "anonymous"
    identity: str = ""

    @property
    def endpoints_dir(self) -> Path:
        """``$GC_HOME/endpoints``: one folder per configured endpoint."""
        return self.home / "endpoints"


def resolve_settings(
    *,
    broker_url: str | None = None,
    registry_url: str | None = None,
    token: str | None = None,
    home: str | Path | None = None,
    user: str | None = None,
    identity: str | None = None,
) -> FabricSettings:
    """Settings from the arguments, else ``GC_BROKER_URL`` / ``GC_REGISTRY_URL`` / ``GC_TOKEN``
    / ``GC_HOME`` / ``GC_USER`` / ``GC_IDENTITY``, else the defaults that match the demo."""
    env = os.environ
    home_dir = Path(home or env.get("GC_HOME") or "~/.gc").expanduser()
    # A token given directly wins; else the one `gc-client login` stored, with its user name.
    token = token or env.get("GC_TOKEN") or None
    stored = read_credentials(home_dir) if token is None else {}
    return FabricSettings(
        broker_url=broker_url or env.get("GC_BROKER_URL") or stored.get("broker_url")
        or DEFAULT_BROKER_URL,
        registry_url=(registry_url or env.get("GC_REGISTRY_URL") or stored.get("registry_url")
                      or DEFAULT_REGISTRY_URL).rstrip("/"),
        token=token or stored.get("token"),
        home=home_dir,
        user=user or env.get("GC_USER") or stored.get("user") or _login_name(),
        identity=identity or env.get("GC_IDENTITY") or "",
    )


def read_credentials(home: Path) -> dict[str, Any]:
    """What ``gc-client login`` stored under ``home``, or nothing if it stored nothing.

    Raises:
        ConfigError: the file is there but cannot be read as a login (it would otherwise
            pass for "not logged in", and every request fail without saying why).
    """
    path = home / CREDENTIALS_FILE
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(_unreadable_login(path, f"{type(exc).__name__}: {exc}")) from exc
    if not isinstance(stored, dict):
        raise ConfigError(_unreadable_login(path, f"it holds a JSON {type(stored).__name__}, "
                                                  "not an object"))
    return stored


def _unreadable_login(path: Path, why: str) -> str:
    return (f"cannot read the stored login {path} ({why}); run `gc-client login` again to "
            "write it anew, or delete it to go on without a token")


def _login_name() -> str:
    """The OS login name, reduced to what a routing-key word may hold."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "anonymous"
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name) or "anonymous"
