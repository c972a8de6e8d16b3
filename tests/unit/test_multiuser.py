"""Identity mapping and user-config templates, as plain functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gc_agent.config import IdentityRule
from gc_agent.multiuser.mapping import lookup_account, map_identity
from gc_agent.multiuser.templates import render_user_engine
from gc_core.errors import ConfigError, PolicyError

TEMPLATES = Path(__file__).resolve().parents[2] / "deploy" / "templates"
RULES = [IdentityRule(match=r"(.*)@uni\.edu", output="{0}"),
         IdentityRule(match=r"(?P<first>\w+)\.(?P<last>\w+)@lab\.org", output="{last}_{first}")]


def test_the_first_matching_rule_names_the_account() -> None:
    assert map_identity("alice@uni.edu", RULES) == "alice"
    assert map_identity("ada.lovelace@lab.org", RULES) == "lovelace_ada"


def test_a_rule_must_match_the_whole_identity() -> None:
    with pytest.raises(PolicyError, match="no identity mapping rule matches"):
        map_identity("alice@uni.edu.evil.com", RULES)


def test_an_external_command_maps_when_no_rule_does() -> None:
    assert map_identity("x@y", [], "tr '@' '_'") == "x_y"
    with pytest.raises(PolicyError):
        map_identity("x@y", [], "true")  # prints nothing: no match


def test_root_and_unknown_accounts_are_refused() -> None:
    with pytest.raises(PolicyError, match="never run as root"):
        lookup_account("root", "admin@uni.edu")
    with pytest.raises(PolicyError, match="not an account on this machine"):
        lookup_account("no-such-account-here", "ghost@uni.edu")


def test_the_shipped_template_renders_defaults_and_allowed_options() -> None:
    template = (TEMPLATES / "local.yaml.j2").read_text()
    schema = json.loads((TEMPLATES / "local.schema.json").read_text())
    assert render_user_engine(template, schema, {}, account="alice").max_workers == 1
    assert render_user_engine(template, schema, {"workers": 3}, account="alice").max_workers == 3
    with pytest.raises(PolicyError, match="refused at workers.*maximum of 4"):
        render_user_engine(template, schema, {"workers": 9}, account="alice")
    with pytest.raises(PolicyError, match="partition"):
        render_user_engine(template, schema, {"partition": "gpu"}, account="alice")


def test_a_template_cannot_reach_outside_its_sandbox() -> None:
    sneaky = "type: processes\nmax_workers: {{ ''.__class__.__mro__[1].__subclasses__() | length }}"
    with pytest.raises(ConfigError):
        render_user_engine(sneaky, {}, {}, account="alice")


def test_a_template_naming_an_unknown_value_is_an_admin_error() -> None:
    with pytest.raises(ConfigError, match="user config template"):
        render_user_engine("type: processes\nmax_workers: {{ cores }}", {}, {}, account="alice")
