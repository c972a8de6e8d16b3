"""gc-fabric's endpoint agent: consumes an endpoint's tasks and runs them on an engine."""

from gc_agent.agent import Agent
from gc_agent.config import EndpointConfig, EngineConfig, load_config
from gc_core.version import VERSION as _VERSION

#: The installed gc-fabric's version (its package metadata).
__version__ = _VERSION

__all__ = ["Agent", "EndpointConfig", "EngineConfig", "load_config"]
