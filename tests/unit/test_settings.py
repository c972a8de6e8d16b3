"""resolve_settings: arguments beat environment variables beat the demo's defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from gc_core.settings import DEFAULT_BROKER_URL, DEFAULT_REGISTRY_URL, resolve_settings

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
