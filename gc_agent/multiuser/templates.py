"""A user's engine configuration, rendered from the administrator's template.

The administrator writes a Jinja2 template of an engine config (YAML) and a JSON Schema
for the options users may set. Values the administrator fixes are written into the
template; defaults live in the schema; a user's options (``user_endpoint_config`` on the
Executor) are validated against the schema before rendering. The template renders in a
``SandboxedEnvironment`` with undefined names as errors; ``account`` is the local account
the task runs as, which no option may rename.

A template written for a Globus Compute multi-user endpoint renders a whole endpoint config
in Globus Compute's words. Its engine is translated as an endpoint's config.yaml is
(:mod:`gc_agent.globus_config`: each key honoured or refused with the reason); nothing else
of an endpoint config means anything for one user's engine, so any other key it sets is
refused by name.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import TypeAdapter, ValidationError

from gc_agent.config import AnyEngineConfig, EngineConfig, HtexEngineConfig
from gc_agent.globus_config import is_globus_compute_config, translate
from gc_core.errors import ConfigError, PolicyError

__all__ = ["render_user_engine", "template_problem"]

_ENVIRONMENT = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
#: A rendered template is any engine section: processes, or htex with its provider.
_ENGINE: TypeAdapter[EngineConfig | HtexEngineConfig] = TypeAdapter(AnyEngineConfig)
#: The account a template is tried with before any task names a real one.
TRIAL_ACCOUNT = "nobody"


def render_user_engine(template: str, schema: dict[str, Any], options: dict[str, Any], *,
                       account: str) -> EngineConfig | HtexEngineConfig:
    """The engine config for one user's options.

    Raises:
        PolicyError: the options break the schema (the message says which and why).
        ConfigError: the administrator's template does not render to a valid engine config,
            or renders the threads engine (a user's tasks run in their own processes).
    """
    try:
        jsonschema.validate(options, schema)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "user_endpoint_config"
        raise PolicyError(f"user_endpoint_config refused at {where}: {exc.message}") from None
    if "account" in options:
        raise PolicyError("user_endpoint_config refused at account: the name is the "
                          "template's own, the local account the task runs as; the "
                          "administrator's schema should offer the option by another name")
    values = {name: spec["default"] for name, spec in schema.get("properties", {}).items()
              if isinstance(spec, dict) and "default" in spec}
    values.update(options)
    try:
        text = _ENVIRONMENT.from_string(template).render(**values, account=account)
        data = yaml.safe_load(text)
        engine = _ENGINE.validate_python(_globus_engine(data) if is_globus_compute_config(data)
                                         else data)
    except (TemplateError, yaml.YAMLError, ValidationError) as exc:
        hint = (" (Globus Compute's own template variables, such as _GC.user_runtime, do not "
                "exist here)" if "'_GC'" in str(exc) else "")
        raise ConfigError(f"the endpoint's user config template does not render to a valid "
                          f"engine config: {exc}{hint}") from exc
    if engine.type == "threads":
        raise ConfigError("a multi-user endpoint runs each user's tasks in that user's own "
                          "processes: the template gives engine type 'threads'; allowed: "
                          "'processes', 'htex'")
    return engine


def template_problem(template: str, schema: dict[str, Any]) -> str | None:
    """Why the template fails every user: it does not render to a user's engine with the
    schema's defaults and no option. None when it does, and when the schema wants options
    first (then only users' tasks can tell)."""
    try:
        render_user_engine(template, schema, {}, account=TRIAL_ACCOUNT)
    except PolicyError:
        return None
    except ConfigError as exc:
        return str(exc)
    return None


def _globus_engine(config: dict[str, Any]) -> Any:
    """The engine section, in our words, of an endpoint config in Globus Compute's.

    Raises:
        ConfigError: it sets a key other than its engine, or its engine a key that cannot
            be honoured (each named, with the reason).
    """
    others = sorted(key for key, value in config.items() if key != "engine" and value is not None)
    if others:
        raise ConfigError(
            f"the endpoint's user config template renders a Globus Compute endpoint config "
            f"setting {', '.join(others)}: only its engine makes a user's engine here (a "
            f"user's engine stops after the endpoint's multi_user.user_idle_timeout and runs "
            f"no set-up command); take them out of the template")
    if config.get("engine") is None:
        raise ConfigError("the endpoint's user config template renders a Globus Compute "
                          "endpoint config without an engine: give it one")
    try:
        return translate({"engine": config["engine"]})["engine"]
    except ConfigError as exc:
        raise ConfigError(f"the endpoint's user config template: {exc}") from None
