"""A broker session logged in as an endpoint's agent, for the commands that act for it.

``gc-agent configure`` declares the endpoint's queues, ``gc-agent delete --with-queues``
deletes them and ``gc-agent diagnose`` looks at them, each as the agent would: on a secured
broker only the agent may (it logs in with its token when the URL carries no credentials).
"""

from __future__ import annotations

from collections.abc import Sequence

from gc_agent.agent import AGENT_TOKEN_REMEDY
from gc_agent.config import EndpointConfig
from gc_core.broker import BrokerSession
from gc_core.broker_login import token_login
from gc_core.settings import AGENT_PREFIX
from gc_core.topology import QueueDeclaration, Topology, load_topology

__all__ = ["agent_session", "endpoint_queues"]


def endpoint_queues(config: EndpointConfig, topology: Topology) -> list[QueueDeclaration]:
    """The endpoint's own queues: its tasks and its commands."""
    return [topology.queue(kind, endpoint_id=config.endpoint_id)
            for kind in ("endpoint_tasks", "endpoint_commands")]


def agent_session(config: EndpointConfig, broker_url: str, token: str | None, *, purpose: str,
                  queues: Sequence[QueueDeclaration] = ()) -> BrokerSession:
    """A session (not started) on ``broker_url`` logged in as ``config``'s agent, named
    after ``purpose`` in the broker's connection list."""
    login = token_login(broker_url, AGENT_PREFIX + config.endpoint_id, token,
                        remedy=AGENT_TOKEN_REMEDY)
    return BrokerSession(broker_url, name=f"gc-agent-{purpose}:{config.endpoint_id}",
                         topology=load_topology(), login=login, queues=queues)


def delete_endpoint_queues(config: EndpointConfig, broker_url: str, token: str | None, *,
                           timeout: float = 15.0) -> list[str]:
    """Delete the endpoint's queues, with whatever waits in them; returns their names.

    Raises:
        BrokerError: the broker could not be reached, or refused.
    """
    session = agent_session(config, broker_url, token, purpose="delete")
    names = [queue.name for queue in endpoint_queues(config, load_topology())]
    session.start(timeout=timeout)
    try:
        for name in names:
            session.delete_queue(name)
        session.wait_settled(timeout)
    finally:
        session.close()
    return names
