"""Engines run tasks: in threads, in local worker processes, on Parsl's HighThroughputExecutor."""

import logging

from gc_agent.config import EndpointConfig, EngineConfig, HtexEngineConfig
from gc_agent.engines.base import Engine, OnDone
from gc_agent.engines.processes import ProcessEngine
from gc_agent.engines.threads import ThreadEngine
from gc_core.errors import ConfigError
from gc_core.extras import missing_extra

__all__ = ["Engine", "OnDone", "ProcessEngine", "ThreadEngine", "make_engine"]

logger = logging.getLogger(__name__)


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
        if config.engine.container is not None:
            raise ConfigError("container_type is not supported on a multi-user endpoint: its "
                              "workers run as each user's own account, which no container "
                              "runtime here starts them as; remove the container keys, or serve "
                              "the container from a single-user endpoint")
        from gc_agent.multiuser.engines import UserEngines

        return UserEngines(config.multi_user, nominal_capacity=config.engine.max_workers)
    if config.engine.container is not None:
        return _container_engine(config)
    if config.engine.type == "threads":
        return ThreadEngine(config.engine.max_workers)
    return ProcessEngine(config.engine.max_workers, devices=config.engine.available_accelerators)


def _container_engine(config: EndpointConfig) -> Engine:
    """A process engine whose workers run in the configured container.

    The threads engine gets one too: a thread cannot enter a container, and running the
    tasks in the agent's own process would ignore the container asked for, so its
    ``max_workers`` become container worker processes (and running tasks can be cancelled).
    """
    from gc_agent.engines.container_workers import ContainerLaunch

    engine = config.engine
    assert isinstance(engine, EngineConfig) and engine.container is not None
    if engine.type == "threads":
        logger.info("engine.type 'threads' with container_type %r: tasks run in %d container "
                    "worker processes, since a thread cannot run inside a container",
                    engine.container_type, engine.max_workers)
    return ProcessEngine(engine.max_workers, ContainerLaunch(container=engine.container),
                         devices=engine.available_accelerators)
