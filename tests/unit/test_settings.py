"""resolve_settings: arguments beat environment variables beat a stored login beats the
demo's defaults; a stored login that cannot be read is named, not ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from gc_core.errors import ConfigError
from gc_core.settings import (
    CREDENTIALS_FILE,
    DEFAULT_BROKER_URL,
    DEFAULT_REGISTRY_URL,
    resolve_settings,
)

GC_VARIABLES = ("GC_BROKER_URL", "GC_REGISTRY_URL", "GC_TOKEN", "GC_HOME", "GC_USER")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in GC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOGNAME", "tester")


def test_without_arguments_or_environment_the_demo_defaults_apply(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))

    settings = resolve_settings()

    assert settings.broker_url == DEFAULT_BROKER_URL
    assert settings.registry_url == DEFAULT_REGISTRY_URL
    assert settings.token is None
    assert settings.home == tmp_path / ".gc"
    assert settings.endpoints_dir == tmp_path / ".gc" / "endpoints"
    assert settings.user == "tester"


def test_environment_variables_beat_the_defaults(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("GC_BROKER_URL", "amqp://env-broker/")
    monkeypatch.setenv("GC_REGISTRY_URL", "http://env-registry:1")
    monkeypatch.setenv("GC_TOKEN", "env-token")
    monkeypatch.setenv("GC_HOME", str(tmp_path / "env-home"))
    monkeypatch.setenv("GC_USER", "env-user")

    settings = resolve_settings()

    assert settings.broker_url == "amqp://env-broker/"
    assert settings.registry_url == "http://env-registry:1"
    assert settings.token == "env-token"
    assert settings.home == tmp_path / "env-home"
    assert settings.user == "env-user"


def test_arguments_beat_environment_variables(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    for name in GC_VARIABLES:
        monkeypatch.setenv(name, f"env-{name}")

    settings = resolve_settings(broker_url="amqp://arg-broker/", registry_url="http://arg:2",
                                token="arg-token", home=tmp_path / "arg-home", user="arg-user")

    assert settings.broker_url == "amqp://arg-broker/"
    assert settings.registry_url == "http://arg:2"
    assert settings.token == "arg-token"
    assert settings.home == tmp_path / "arg-home"
    assert settings.user == "arg-user"


def test_an_empty_token_variable_means_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GC_TOKEN", "")

    assert resolve_settings().token is None


def test_a_trailing_slash_is_dropped_from_the_registry_url() -> None:
    assert resolve_settings(registry_url="http://registry:8765/").registry_url == "http://registry:8765"


def test_a_home_with_a_tilde_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))

    assert resolve_settings(home="~/elsewhere").home == tmp_path / "elsewhere"


def test_the_login_name_is_reduced_to_what_a_routing_key_word_may_hold(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGNAME", "Jane Doe.smith@lab")

    assert resolve_settings().user == "Jane_Doe_smith_lab"


def test_a_stored_login_supplies_the_token_and_user(tmp_path: Path) -> None:
    (tmp_path / CREDENTIALS_FILE).write_text('{"token": "t0k", "user": "alice"}')

    settings = resolve_settings(home=tmp_path)

    assert (settings.token, settings.user) == ("t0k", "alice")


def test_no_stored_login_is_no_token(tmp_path: Path) -> None:
    assert resolve_settings(home=tmp_path).token is None


@pytest.mark.parametrize("content", ['{"token": "t0k", ', "[1, 2]", "\x00\x01"],
                         ids=["truncated", "not-an-object", "binary"])
def test_a_corrupt_stored_login_is_named_not_ignored(tmp_path: Path, content: str) -> None:
    # A corrupt file used to read as "not logged in": requests then went out anonymous
    # and failed with a 401 that said nothing about the file.
    (tmp_path / CREDENTIALS_FILE).write_text(content)

    with pytest.raises(ConfigError, match=r"credentials\.json.*gc-client login"):
        resolve_settings(home=tmp_path)
