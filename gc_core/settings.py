"""Where to find the broker, the registry and local state: arguments, then environment,
then the stored login, then defaults (pydantic-settings, with one source of our own)."""

from __future__ import annotations

import getpass
import json
import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

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


def _login_name() -> str:
    """The OS login name, reduced to what a routing-key word may hold."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "anonymous"
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name) or "anonymous"


class FabricSettings(BaseSettings):
    """How one process reaches the fabric: each field from an argument, else its ``GC_*``
    environment variable (an empty one counts as unset), else the stored login, else the
    default that matches the demo."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", env_prefix="GC_",
                                      env_ignore_empty=True, validate_default=True)

    broker_url: str = DEFAULT_BROKER_URL
    registry_url: str = DEFAULT_REGISTRY_URL
    token: str | None = None
    home: Path = Path("~/.gc")
    user: str = Field(default_factory=_login_name)
    identity: str = ""

    @field_validator("registry_url")
    @classmethod
    def _without_trailing_slash(cls, url: str) -> str:
        return url.rstrip("/")

    @field_validator("home")
    @classmethod
    def _expanded(cls, home: Path) -> Path:
        return home.expanduser()

    @property
    def endpoints_dir(self) -> Path:
        """``$GC_HOME/endpoints``: one folder per configured endpoint."""
        return self.home / "endpoints"

    @classmethod
    def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _StoredLogin(settings_cls, init_settings, env_settings)


class _StoredLogin(PydanticBaseSettingsSource):
    """What ``gc-client login`` stored under the home the sources above it name, read only
    when they give no token: a token given directly comes with no stored user or URLs."""

    def __init__(self, settings_cls: type[BaseSettings], *above: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._above = above

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        given: dict[str, Any] = {}
        for source in reversed(self._above):  # the first source wins
            given.update(source())
        if given.get("token"):
            return {}
        stored = read_credentials(Path(given.get("home") or "~/.gc").expanduser())
        return {key: stored[key] for key in _STORED_FIELDS if stored.get(key)}


#: What a stored login may supply.
_STORED_FIELDS = ("broker_url", "registry_url", "token", "user")


def resolve_settings(
    *,
    broker_url: str | None = None,
    registry_url: str | None = None,
    token: str | None = None,
    home: str | Path | None = None,
    user: str | None = None,
    identity: str | None = None,
) -> FabricSettings:
    """Settings from the arguments given (None means not given), else ``GC_BROKER_URL`` /
    ``GC_REGISTRY_URL`` / ``GC_TOKEN`` / ``GC_HOME`` / ``GC_USER`` / ``GC_IDENTITY``, else
    the stored login, else the defaults that match the demo.

    Raises:
        ConfigError: the stored login is there but cannot be read.
    """
    given: dict[str, Any] = {"broker_url": broker_url, "registry_url": registry_url, "token": token,
             "home": home, "user": user, "identity": identity}
    return FabricSettings(**{name: value for name, value in given.items() if value})


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
