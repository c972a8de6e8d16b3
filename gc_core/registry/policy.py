"""What a principal may do with endpoints and functions.

One set of decisions serves the HTTP API, the broker's auth backend (``/auth/*``) and the
agents' defence-in-depth checks, so the three can never disagree.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from gc_core.errors import Forbidden, NotFound
from gc_core.registry.db import EndpointRow, FunctionRow, GroupMemberRow
from gc_core.registry.identity import Principal, principal_of_user

__all__ = [
    "agent_function_refusal",
    "endpoint_or_404",
    "function_refusal",
    "may_see_endpoint",
    "may_submit",
    "may_use_function",
    "principal_of_user",
    "require_agent_may_read",
    "require_endpoint_owner",
    "task_refusal",
]


def may_submit(principal: Principal, endpoint: EndpointRow) -> bool:
    """Whether ``principal`` may send tasks (and cancel commands) to ``endpoint``."""
    return (principal.admin or principal.name == endpoint.owner
            or principal.name in endpoint.allowed_users
            or not principal.groups.isdisjoint(endpoint.allowed_groups))


def may_see_endpoint(principal: Principal, endpoint: EndpointRow) -> bool:
    """Listed endpoints are seen by all; private ones by those who may use them, and their agent."""
    return (endpoint.visibility == "listed" or may_submit(principal, endpoint)
            or principal.endpoint_id == endpoint.endpoint_id)


def may_use_function(principal: Principal, function: FunctionRow) -> bool:
    """Whether ``principal`` may run (and read) ``function`` by its sharing."""
    return (principal.admin or principal.name == function.owner or function.sharing == "public"
            or (function.sharing == "groups"
                and not principal.groups.isdisjoint(function.shared_groups)))


def function_refusal(principal: Principal, function: FunctionRow,
                     endpoint: EndpointRow) -> str | None:
    """Why ``principal`` may not run ``function`` on ``endpoint``, or None if it may."""
    if not may_use_function(principal, function):
        return (f"function {function.function_id} belongs to {function.owner} and is not shared "
                f"with {principal.name}")
    return _not_permitted(function, endpoint)


def agent_function_refusal(db: Session, function: FunctionRow,
                           endpoint: EndpointRow) -> str | None:
    """Why the agent of ``endpoint`` may not read ``function``, or None if it may: only a
    function the endpoint may run for one of its submitters, by their own rights.

    Its submitters are its owner, its allowed users and the members of its allowed groups;
    an administrator's right to run anything is left out, or every agent could read every
    function.
    """
    refusal = _not_permitted(function, endpoint)
    if refusal is not None or function.sharing == "public":
        return refusal
    users = {function.owner}
    if function.sharing == "groups":
        users.update(db.scalars(select(GroupMemberRow.user).where(
            GroupMemberRow.group.in_(function.shared_groups))))
    if _any_submitter(db, users, endpoint):
        return None
    return (f"endpoint {endpoint.endpoint_id} may not run function {function.function_id}: it "
            f"belongs to {function.owner} and is not shared with the endpoint's users")


def _any_submitter(db: Session, users: set[str], endpoint: EndpointRow) -> bool:
    """Whether any of ``users`` may submit to ``endpoint`` (admins aside)."""
    if endpoint.owner in users or not users.isdisjoint(endpoint.allowed_users):
        return True
    member = select(GroupMemberRow.user).where(GroupMemberRow.user.in_(users),
                                               GroupMemberRow.group.in_(endpoint.allowed_groups))
    return db.scalars(member.limit(1)).first() is not None


def _not_permitted(function: FunctionRow, endpoint: EndpointRow) -> str | None:
    """Why ``endpoint``'s own list of permitted functions leaves ``function`` out, or None."""
    if endpoint.allowed_functions is None or function.function_id in endpoint.allowed_functions:
        return None
    return (f"endpoint {endpoint.endpoint_id} runs only its permitted functions, and "
            f"{function.function_id} is not one; its owner can add it with "
            f"`gc-client policy set {endpoint.endpoint_id} --allow-function "
            f"{function.function_id}`")


def task_refusal(db: Session, endpoint: EndpointRow, user: str, function_id: str,
                 content_type: str, on_behalf_of: str = "") -> str | None:
    """Why ``endpoint`` must refuse a task ``user`` sent, or None: the agents' re-check."""
    principal = principal_of_user(db, user)
    if principal is None:
        return f"{user} is not a registered user"
    if on_behalf_of and principal.kind != "service":
        return (f"{user} is not a service account, so it may not submit on behalf of "
                f"{on_behalf_of}; an administrator creates service accounts with "
                "`gc-registry user create NAME --service`")
    if not may_submit(principal, endpoint):
        return f"{user} is not allowed to use endpoint {endpoint.endpoint_id}"
    function = db.get(FunctionRow, function_id)
    if function is None:
        return f"no function {function_id} is registered"
    refusal = function_refusal(principal, function, endpoint)
    if refusal is None and endpoint.allowed_serializers is not None \
            and content_type not in endpoint.allowed_serializers:
        refusal = (f"endpoint {endpoint.endpoint_id} takes only "
                   f"{', '.join(endpoint.allowed_serializers)}, not {content_type}")
    return refusal


def require_agent_may_read(db: Session, agent: Principal, function_id: str) -> None:
    """Raise ``Forbidden`` unless ``agent``'s endpoint may run the function (see
    ``agent_function_refusal``), ``NotFound`` if there is no such function."""
    function = db.get(FunctionRow, function_id)
    endpoint = None if agent.endpoint_id is None else db.get(EndpointRow, agent.endpoint_id)
    if function is None or endpoint is None:
        raise NotFound(f"no function {function_id} is registered")
    refusal = agent_function_refusal(db, function, endpoint)
    if refusal is not None:
        raise Forbidden(refusal)


def require_endpoint_owner(principal: Principal, endpoint: EndpointRow) -> None:
    """Raise ``Forbidden`` unless ``principal`` owns ``endpoint`` (or is an admin)."""
    if not (principal.admin or principal.name == endpoint.owner):
        raise Forbidden(f"only {endpoint.owner}, who owns endpoint {endpoint.endpoint_id}, "
                        "or an administrator may change it")


def endpoint_or_404(db: Session, principal: Principal, endpoint_id: str) -> EndpointRow:
    """An endpoint the principal may see; an invisible one is reported as missing."""
    row = db.get(EndpointRow, endpoint_id)
    if row is None or not may_see_endpoint(principal, row):
        raise NotFound(f"no endpoint {endpoint_id} is registered (or it is private and not "
                       "shared with you)")
    return row
