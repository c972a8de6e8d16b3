"""Engines run tasks: in threads, in local worker processes."""

from gc_agent.config import EndpointConfig
from gc_agent.engines.base import Engine, OnDone
from gc_agent.engines.processes import ProcessEngine
from gc_agent.engines.threads import ThreadEngine

__all__ = ["Engine", "OnDone", "ProcessEngine", "ThreadEngine", "make_engine"]


def make_engine(config: EndpointConfig) -> Engine:
    """The engine an endpoint's config asks for."""
    if config.multi_user is not None:
        from gc_agent.multiuser.engines import UserEngines

        return UserEngines(config.multi_user, nominal_capacity=config.engine.max_workers)
    if config.engine.type == "threads":
        return ThreadEngine(config.engine.max_workers)
    return ProcessEngine(config.engine.max_workers)
