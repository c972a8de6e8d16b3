"""Whether this endpoint may run a task, and whom it may believe: pure checks."""

from __future__ import annotations

from gc_agent.config import EndpointConfig
from gc_core.errors import ConfigError, GCError, PolicyError, VersionMismatch
from gc_core.protocol import ErrorInfo, TaskMessage
from gc_core.serialize import (
    CLOUDPICKLE,
    PYTHON_VERSION,
    check_allowed,
    get_serializer,
    python_minor,
)

__all__ = ["check_identities_verifiable", "refusal", "verifies_senders"]


def refusal(task: TaskMessage, *, endpoint_id: str, allowed_serializers: frozenset[str],
            allowed_functions: frozenset[str] | None = None) -> ErrorInfo | None:
    """Why this endpoint refuses ``task``, or None if it may run."""
    try:
        _check(task, endpoint_id=endpoint_id, allowed_serializers=allowed_serializers)
        if allowed_functions is not None and task.function_id not in allowed_functions:
            raise PolicyError(f"function {task.function_id} is not in endpoint {endpoint_id}'s "
                              "allowed_functions; its owner may add it to the config's list")
    except GCError as exc:
        return ErrorInfo(type=type(exc).__name__, message=str(exc))
    return None


def _check(task: TaskMessage, *, endpoint_id: str, allowed_serializers: frozenset[str]) -> None:
    if task.endpoint_id != endpoint_id:
        raise PolicyError(f"task {task.task_id} is addressed to endpoint {task.endpoint_id}, "
                          f"not to this one ({endpoint_id})")
    serializer = get_serializer(task.content_type)
    check_allowed(serializer, allowed_serializers)
    # Pickled functions carry bytecode, which changes between Python minor versions.
    if serializer is CLOUDPICKLE and task.sender_python \
            and python_minor(task.sender_python) != python_minor(PYTHON_VERSION):
        raise VersionMismatch(
            "Python", local=PYTHON_VERSION, remote=task.sender_python,
            detail="cloudpickle payloads only load on the Python minor version that made "
                   "them; run the client and the endpoint on the same Python, or send "
                   "JSON arguments to a function registered from a matching client")


def verifies_senders(config: EndpointConfig, *, token_login: bool) -> bool:
    """Whether the broker's ``user_id`` on a message names who sent it.

    The broker checks every ``user_id`` against its sender's login; that names the sender
    where logins are the registry's users. An agent that logs in with its token knows it is
    on such a broker (a secured one); elsewhere only its administrator can say so, with
    ``broker_verifies_user_id``.
    """
    return token_login or config.broker_verifies_user_id


def check_identities_verifiable(config: EndpointConfig, *, verified: bool) -> None:
    """Refuse a multi-user endpoint that would map identities nobody verified.

    Raises:
        ConfigError: multi-user, senders unverifiable, and the administrator did not opt out.
    """
    if config.multi_user is None or verified or config.multi_user.insecure_trust_claimed_identities:
        return
    raise ConfigError(
        f"multi-user endpoint {config.name} cannot verify who sends its tasks, so any sender "
        "could claim another user's name and run as their account: on a secured broker give "
        "the agent its token_file and a broker URL without credentials, so that it logs in "
        f"as endpoint-{config.endpoint_id}; set broker_verifies_user_id: true if broker_url's "
        "credentials log in to a broker whose users are the registry's; or — only where one "
        "person sends every task — set multi_user.insecure_trust_claimed_identities: true")
