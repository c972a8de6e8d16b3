"""An endpoint's config file: loading, validation messages, and saving."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from gc_agent.config import EndpointConfig, EngineConfig, load_config, save_config
from gc_core.errors import ConfigError

VALID = """\
name: lab
endpoint_id: 6f1c2d3e-0000-4000-8000-000000000001
description: the lab's box
broker_url: amqp://gc:secret@broker:5672/%2F
engine:
  type: threads
  max_workers: 8
prefetch: 32
allowed_serializers: [json]
heartbeat_period: 2.5
"""


def test_load_config_reads_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(VALID)

    config = load_config(path)

    assert config.name == "lab"
    assert config.endpoint_id == "6f1c2d3e-0000-4000-8000-000000000001"
    assert config.broker_url == "amqp://gc:secret@broker:5672/%2F"
    assert config.registry_url is None
    assert config.engine == EngineConfig(type="threads", max_workers=8)
    assert config.prefetch == 32
    assert config.allowed_serializers == frozenset({"json"})
    assert config.heartbeat_period == 2.5
    assert config.drain_timeout == 30.0


def test_a_minimal_config_gets_the_demo_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("name: lab\nendpoint_id: ep-1\n")

    config = load_config(path)

    assert config.engine == EngineConfig(type="processes", max_workers=2)
    assert config.allowed_serializers == frozenset({"cloudpickle", "json"})
    assert config.prefetch is None


def test_load_config_of_a_missing_file_tells_to_run_configure(tmp_path: Path) -> None:
    path = tmp_path / "endpoints" / "lab" / "config.yaml"

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(path) in str(info.value)
    assert "gc-agent configure" in str(info.value)


def test_load_config_of_a_bad_engine_type_names_the_key_and_the_value(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("name: lab\nendpoint_id: ep-1\nengine: {type: slurm}\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert "engine.type" in str(info.value)
    assert "'slurm'" in str(info.value)
    assert str(path) in str(info.value)


def test_load_config_refuses_an_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("name: lab\nendpoint_id: ep-1\nworkers: 4\n")

    with pytest.raises(ConfigError, match="workers"):
        load_config(path)


def test_load_config_of_a_file_that_is_not_yaml_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("name: [lab\n")

    with pytest.raises(ConfigError, match="cannot read"):
        load_config(path)


def test_save_config_writes_a_file_only_its_owner_can_read(tmp_path: Path) -> None:
    path = tmp_path / "endpoints" / "lab" / "config.yaml"

    save_config(EndpointConfig(name="lab", endpoint_id="ep-1"), path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_config_then_load_config_gives_the_same_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    config = EndpointConfig(
        name="lab", endpoint_id="ep-1", description="d", broker_url="amqp://u:p@h/%2F",
        engine=EngineConfig(type="threads", max_workers=3), prefetch=7,
        allowed_serializers=frozenset({"json", "cloudpickle"}), heartbeat_period=1.0,
        drain_timeout=0.0)

    save_config(config, path)

    assert load_config(path) == config


def test_save_config_tightens_the_mode_of_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("old")
    path.chmod(0o644)

    save_config(EndpointConfig(name="lab", endpoint_id="ep-1"), path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_config_never_leaves_a_new_file_readable_by_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a umask that lets others read new files (the common default)
    old_umask = os.umask(0o022)
    try:
        # When save_config writes, look at the file's mode the moment its text is on disk
        # (a fix that creates the file 0600 without Path.write_text passes as well)
        modes: list[int] = []
        real_write_text = Path.write_text

        def write_text_then_look(self: Path, *args: Any, **kwargs: Any) -> int:
            written = real_write_text(self, *args, **kwargs)
            modes.append(stat.S_IMODE(self.stat().st_mode))
            return written

        monkeypatch.setattr(Path, "write_text", write_text_then_look)
        save_config(EndpointConfig(name="lab", endpoint_id="ep-1",
                                   broker_url="amqp://gc:secret@h/%2F"), tmp_path / "config.yaml")
    finally:
        os.umask(old_umask)

    # Then others could never read it
    assert all(mode & 0o077 == 0 for mode in modes), [oct(m) for m in modes]
