"""What a principal may do with endpoints and functions.

One set of decisions serves the HTTP API, the broker's auth backend (``/auth/*``) and the
agents' defence-in-depth checks, so the three can never disagree.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from gc_core.errors import Forbidden, NotFound
from gc_core.registry.db import EndpointRow, FunctionRow
from gc_core.registry.identity import Principal, principal_of_user

__all__ = [
    "endpoint_or_404",
    "function_refusal",
    "may_see_endpoint",
    "may_submit",
    "may_use_function",
    "principal_of_user",
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
    if endpoint.allowed_functions is not None and function.function_id not in endpoint.allowed_functions:
        return (f"endpoint {endpoint.endpoint_id} runs only its permitted functions, and "
                f"{function.function_id} is not one; its owner can add it with "
                f"`gc-client policy set {endpoint.endpoint_id} --allow-function "
                f"{function.function_id}`")
    return None


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
