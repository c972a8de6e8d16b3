"""Whether this endpoint may run a task, and whom it may believe: pure checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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

__all__ = ["RESOURCE_KEYS", "check_identities_verifiable", "refusal", "resource_spec_problem",
           "verifies_senders"]

#: Every key a task's resource specification may hold, on every engine, with the types
#: allowed: Parsl's HTEX takes ``priority`` (lower runs first; the local engines run tasks
#: in order); the MPI keys (Parsl's MPI-mode names) size an MPIFunction's launch on the
#: worker, which sees the whole specification (``gc_core.task_context``). Any other key is
#: refused rather than ignored, so that a task asking for what no engine gives (``num_gpus``,
#: ``cores``) is told so instead of running without it.
RESOURCE_KEYS: dict[str, tuple[type, ...]] = {
    "priority": (int, float), "num_nodes": (int,), "ranks_per_node": (int,),
    "num_ranks": (int,), "launcher_options": (str,)}


def refusal(task: TaskMessage, *, endpoint_id: str, allowed_serializers: frozenset[str],
            allowed_functions: frozenset[str] | None = None) -> ErrorInfo | None:
    """Why this endpoint refuses ``task``, or None if it may run."""
    if task.resource_spec and (problem := resource_spec_problem(task.resource_spec)):
        return ErrorInfo(type="InvalidResourceSpecification",
                         message=f"task {task.task_id}: {problem}")
    try:
        _check(task, endpoint_id=endpoint_id, allowed_serializers=allowed_serializers)
        if allowed_functions is not None and task.function_id not in allowed_functions:
            raise PolicyError(f"function {task.function_id} is not in endpoint {endpoint_id}'s "
                              "allowed_functions; its owner may add it to the config's list")
    except GCError as exc:
        return ErrorInfo(type=type(exc).__name__, message=str(exc))
    return None


def resource_spec_problem(spec: Mapping[str, Any]) -> str | None:
    """What is wrong with a task's resource specification, or None."""
    allowed = ", ".join(RESOURCE_KEYS)
    for key, value in spec.items():
        types = RESOURCE_KEYS.get(key)
        if types is None:
            return (f"resource_specification key {key!r} is not supported by gc-fabric's "
                    f"engines; allowed: {allowed}")
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join(t.__name__ for t in types)
            return (f"resource_specification {key!r} must be {wanted}, got {value!r}")
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
