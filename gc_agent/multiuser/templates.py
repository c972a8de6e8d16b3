"""A user's engine configuration, rendered from the administrator's template.

The administrator writes a Jinja2 template of an engine config (YAML) and a JSON Schema
for the options users may set. Values the administrator fixes are written into the
template; defaults live in the schema; a user's options (``user_endpoint_config`` on the
Executor) are validated against the schema before rendering. The template renders in a
``SandboxedEnvironment`` with undefined names as errors.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import TypeAdapter, ValidationError

from gc_agent.config import AnyEngineConfig, EngineConfig, HtexEngineConfig
from gc_core.errors import ConfigError, PolicyError

__all__ = ["render_user_engine"]

_ENVIRONMENT = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
#: A rendered template is any engine section: processes, or htex with its provider.
_ENGINE: TypeAdapter[EngineConfig | HtexEngineConfig] = TypeAdapter(AnyEngineConfig)


def render_user_engine(template: str, schema: dict[str, Any], options: dict[str, Any], *,
                       account: str) -> EngineConfig | HtexEngineConfig:
    """The engine config for one user's options.

    Raises:
        PolicyError: the options break the schema (the message says which and why).
        ConfigError: the administrator's template does not render to a valid engine config.
    """
    try:
        jsonschema.validate(options, schema)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "user_endpoint_config"
        raise PolicyError(f"user_endpoint_config refused at {where}: {exc.message}") from None
    values = {name: spec["default"] for name, spec in schema.get("properties", {}).items()
              if isinstance(spec, dict) and "default" in spec}
    values.update(options)
    try:
        text = _ENVIRONMENT.from_string(template).render(**values, account=account)
        return _ENGINE.validate_python(yaml.safe_load(text))
    except (TemplateError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"the endpoint's user config template does not render to a valid "
                          f"engine config: {exc}") from exc
