"""Engines run tasks: in threads, in local worker processes, on Parsl's HighThroughputExecutor."""

from gc_agent.config import EndpointConfig, HtexEngineConfig
from gc_agent.engines.base import Engine, OnDone
from gc_agent.engines.processes import ProcessEngine
from gc_agent.engines.threads import ThreadEngine
from gc_core.errors import ConfigError
from gc_core.extras import missing_extra

__all__ = ["Engine", "OnDone", "ProcessEngine", "ThreadEngine", "make_engine"]


def make_engine(config: EndpointConfig) -> Engine:
    """The engine an endpoint's config asks for."""
    if isinstance(config.engine, HtexEngineConfig):
        if config.multi_user is not None:
            raise ConfigError("engine.type 'htex' is not allowed on a multi-user endpoint's own "
                              "config (allowed there: 'processes', whose max_workers sizes the "
                              "agent's prefetch); each user gets an htex engine of their own "
                              "when the user_config_template renders one")
        problem = missing_extra("htex")
        if problem is not None:
            raise ConfigError(f"engine.type 'htex' {problem}")
        # Imported here: Parsl loads only on endpoints that use it.
        from gc_agent.engines.htex import HtexEngine, default_run_dir

        return HtexEngine(config.engine, default_run_dir(config.name, config.engine))
    if config.multi_user is not None:
        from gc_agent.multiuser.engines import UserEngines

        return UserEngines(config.multi_user, nominal_capacity=config.engine.max_workers)
    if config.engine.type == "threads":
        return ThreadEngine(config.engine.max_workers)
    return ProcessEngine(config.engine.max_workers)
