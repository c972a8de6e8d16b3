"""Engines run tasks: in threads, in local worker processes."""

from gc_agent.config import EngineConfig
from gc_agent.engines.base import Engine, OnDone
from gc_agent.engines.processes import ProcessEngine
from gc_agent.engines.threads import ThreadEngine

__all__ = ["Engine", "OnDone", "ProcessEngine", "ThreadEngine", "make_engine"]


def make_engine(config: EngineConfig) -> Engine:
    """The engine an endpoint's config asks for."""
    if config.type == "threads":
        return ThreadEngine(config.max_workers)
    return ProcessEngine(config.max_workers)
