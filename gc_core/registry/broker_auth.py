"""The broker's auth backend: RabbitMQ asks these routes who may connect and do what.

``rabbitmq_auth_backend_http`` (behind ``rabbitmq_auth_backend_cache``) POSTs a form to
``/auth/user``, ``/auth/vhost``, ``/auth/resource`` and ``/auth/topic`` and reads a plain
``allow`` or ``deny`` back (see ``broker_config/rabbitmq.conf``). A user or an agent logs
in with its registry token as the password; the decisions below are plain functions of the
principal and the names from ``gc_core.topology``, and endpoint policy comes from
``policy.may_submit``, the same rule the HTTP API and the agents apply. The registry's own
broker account is the broker's internal user and never reaches this module.

What a principal may do (anything else is refused):

- users and service accounts: publish to ``gc.tasks`` and ``gc.commands`` only with the
  id of an endpoint whose policy lets them submit; publish task-group manifests to
  ``gc.events``; declare, bind, consume and delete their own result queues
  ``gc.results.<name>.*``, bound to ``gc.results`` only with their own ``<name>.*`` keys.
- the agent of endpoint E (``endpoint-E``): declare and consume ``gc.ep.E.tasks`` and
  ``gc.ep.E.commands``, bound to E's routing key only; publish results to anyone (it
  answers whoever submitted), E's heartbeats, and tasks to E alone (a redelivered batch's
  tasks, put back one per message, which the agent seals: it takes no task stamped with its
  own account without its seal); write to ``gc.dead``, which RabbitMQ
  requires of whoever declares a queue with that dead-letter exchange.

Dead-letter arguments: declaring a queue with ``x-dead-letter-exchange: X`` makes RabbitMQ
ask ``read`` on the queue and ``write`` on X, exactly as a publish to X would ask; the
queue's arguments never reach this backend. So nobody may name as dead-letter exchange one
it may not publish to (``gc.dead`` and ``gc.results`` for users, the default exchange and
``amq.*`` for all), but a user's result queue may still dead-letter into ``gc.tasks``,
``gc.commands`` or ``gc.events``, bypassing the routing-key check there: receivers must
refuse a message that carries an ``x-death`` header where no dead letter belongs.

Only the broker may ask (``broker_auth_secret``): it presents the registry's broker secret
as HTTP basic auth, which ``rabbitmq_auth_backend_http`` sends from the user info of its
``auth_http.*_path`` URLs. A registry without that secret answers callers on its own host
only.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import re
from collections.abc import Callable
from typing import Annotated
from urllib.parse import parse_qsl, urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy.orm import Session

from gc_core.broker_login import broker_vhost
from gc_core.errors import Forbidden, NotAuthenticated
from gc_core.registry import identity, policy
from gc_core.registry.db import EndpointRow
from gc_core.registry.deps import Db
from gc_core.registry.identity import AGENT_PREFIX, Principal
from gc_core.topology import Topology, load_topology

__all__ = ["resource_allowed", "router", "topic_allowed"]

logger = logging.getLogger(__name__)

ALLOW = "allow"
DENY = "deny"

#: Form fields longer than this are refused outright (a token is ~50 characters).
MAX_FIELD = 1024
#: Form fields named in the log line of a refusal.
_LOGGED_FIELDS = ("vhost", "resource", "name", "permission", "routing_key")


# -- the decisions: plain functions -------------------------------------------------------

def resource_allowed(who: Principal, resource: str, name: str, permission: str,
                     topology: Topology) -> bool:
    """Whether ``who`` may ``permission`` (configure, write, read) exchange or queue ``name``.

    Nobody here may configure an exchange: the definitions file and the registry's own
    account declare them. The default exchange (``amq.default``) is refused to all, as
    publishing there names a queue directly and would skip the routing-key checks.
    """
    if resource == "exchange":
        return (_exchange_role(name, topology), permission) in _exchange_rights(who)
    if resource == "queue":
        return any(pattern.fullmatch(name) for pattern in _own_queues(who, topology))
    return False


def topic_allowed(who: Principal, exchange: str, permission: str, routing_key: str,
                  topology: Topology, may_submit_to: Callable[[str], bool]) -> bool:
    """Whether ``who`` may publish (write) with, or bind (read) with, ``routing_key``.

    ``may_submit_to(endpoint_id)`` answers the endpoint policy for users.
    """
    role = _exchange_role(exchange, topology)
    if who.kind == "agent" and who.endpoint_id is not None:
        mine = who.endpoint_id
        if permission == "read" and role in ("tasks", "commands"):
            kind = "task" if role == "tasks" else "command"
            return routing_key == topology.routing_key(kind, endpoint_id=mine)
        if permission == "write" and role == "results":
            return bool(topology.routing_key_pattern("result").fullmatch(routing_key))
        if permission == "write" and role == "events":
            return routing_key == topology.routing_key("heartbeat", endpoint_id=mine)
        if permission == "write" and role == "tasks":
            return routing_key == topology.routing_key("task", endpoint_id=mine)
        return False
    if who.kind not in ("user", "service"):
        return False
    if permission == "write" and role in ("tasks", "commands"):
        kind = "task" if role == "tasks" else "command"
        return bool(topology.routing_key_pattern(kind).fullmatch(routing_key)) \
            and may_submit_to(routing_key)
    if permission == "write" and role == "events":
        return bool(topology.routing_key_pattern("group_submitted").fullmatch(routing_key))
    if permission == "read" and role == "results":
        return bool(topology.routing_key_pattern("result", user=who.name).fullmatch(routing_key))
    return False


def _exchange_role(name: str, topology: Topology) -> str | None:
    return next((role for role, (exchange, _type) in topology.exchanges.items()
                 if exchange == name), None)


def _exchange_rights(who: Principal) -> frozenset[tuple[str | None, str]]:
    if who.kind == "agent":
        return frozenset({("tasks", "read"), ("tasks", "write"), ("commands", "read"),
                          ("results", "write"), ("events", "write"), ("dead", "write")})
    if who.kind in ("user", "service"):
        return frozenset({("tasks", "write"), ("commands", "write"), ("events", "write"),
                          ("results", "read")})
    return frozenset()


def _own_queues(who: Principal, topology: Topology) -> list[re.Pattern[str]]:
    if who.kind == "agent" and who.endpoint_id is not None:
        return [topology.queue_name_pattern(kind, endpoint_id=who.endpoint_id)
                for kind in ("endpoint_tasks", "endpoint_commands", "agent_commands")]
    if who.kind in ("user", "service"):
        return [topology.queue_name_pattern("results", user=who.name)]
    return []


# -- who may ask: the broker -------------------------------------------------------------

def _from_the_broker(request: Request) -> None:
    """Refuse a caller that is not the broker: it must present the broker secret, or, on a
    registry without one, call from this host."""
    secret = request.app.state.settings.broker_auth_secret
    peer = request.client.host if request.client is not None else ""
    if secret is None:
        if _on_this_host(peer):
            return
        logger.warning("broker auth: refused a question from %r, not on this host", peer)
        raise Forbidden("only the broker may ask /auth/*: this registry has no broker secret "
                        "(gc-registry serve --broker-auth-secret-file), so it answers callers "
                        "on its own host only")
    presented = _basic_password(request.headers.get("authorization", ""))
    if presented is None or not hmac.compare_digest(presented.encode(),
                                                    secret.get_secret_value().encode()):
        logger.warning("broker auth: refused a question from %r without the broker secret",
                       peer)
        raise Forbidden("only the broker may ask /auth/*: it presents the registry's broker "
                        "secret as HTTP basic auth (auth_http.user_path = "
                        "http://rabbitmq:SECRET@registry/auth/user, and so on)")


def _on_this_host(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _basic_password(header: str) -> str | None:
    """The password of an ``Authorization: Basic`` header, or None."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    _user, colon, password = decoded.partition(":")
    return password if colon else None


router = APIRouter(prefix="/auth", include_in_schema=False,
                   dependencies=[Depends(_from_the_broker)])


# -- the routes: thin --------------------------------------------------------------------

async def _form(request: Request) -> dict[str, str]:
    """The broker's URL-encoded form (no python-multipart needed for that)."""
    body = (await request.body()).decode("utf-8", "replace")
    fields = dict(parse_qsl(body, keep_blank_values=True))
    return {k: v for k, v in fields.items() if len(v) <= MAX_FIELD}


Form = Annotated[dict[str, str], Depends(_form)]


def _answer(allowed: bool, what: str, form: dict[str, str]) -> PlainTextResponse:
    if not allowed:
        # repr: names come from clients, and a newline in one would forge a log line.
        logger.info("broker auth: refused %s for %r (%s)", what, form.get("username", ""),
                    " ".join(f"{k}={form[k]!r}" for k in _LOGGED_FIELDS if k in form))
    return PlainTextResponse(ALLOW if allowed else DENY)


def _principal(db: Session, username: str) -> Principal | None:
    """Who ``username`` is: the broker asks only after ``/auth/user`` let it in."""
    if username.startswith(AGENT_PREFIX):
        endpoint_id = username[len(AGENT_PREFIX):]
        endpoint = db.get(EndpointRow, endpoint_id)
        if endpoint is None:
            return None
        return Principal(name=username, kind="agent", endpoint_id=endpoint_id,
                         owner=endpoint.owner)
    return policy.principal_of_user(db, username)


def _in_fabric_vhost(request: Request, form: dict[str, str]) -> bool:
    return form.get("vhost") == broker_vhost(request.app.state.settings.broker_url)


@router.post("/user", response_class=PlainTextResponse)
def auth_user(form: Form, db: Db, request: Request) -> PlainTextResponse:
    """Log in: the password is a registry token, and it must stand for the user name."""
    username, token = form.get("username", ""), form.get("password", "")
    try:
        principal = identity.authenticate(db, token) if token else None
    except NotAuthenticated as exc:
        logger.info("broker auth: refused login of %r: %s", username, exc)
        return PlainTextResponse(DENY)
    # The registry's own account logs in through the broker's internal backend only; a
    # registry user of that name must never pass as it (agents trust its user_id).
    own_account = urlsplit(request.app.state.settings.broker_url).username
    allowed = principal is not None and principal.name == username != own_account
    return _answer(allowed, "login", form)


@router.post("/vhost", response_class=PlainTextResponse)
def auth_vhost(form: Form, db: Db, request: Request) -> PlainTextResponse:
    """Only the fabric's vhost (the one the registry's ledger uses)."""
    allowed = _in_fabric_vhost(request, form) and _principal(db, form.get("username", "")) is not None
    return _answer(allowed, "vhost", form)


@router.post("/resource", response_class=PlainTextResponse)
def auth_resource(form: Form, db: Db, request: Request) -> PlainTextResponse:
    """Configure, write or read one exchange or queue."""
    who = _principal(db, form.get("username", ""))
    allowed = who is not None and _in_fabric_vhost(request, form) and resource_allowed(
        who, form.get("resource", ""), form.get("name", ""), form.get("permission", ""),
        load_topology())
    return _answer(allowed, "resource", form)


@router.post("/topic", response_class=PlainTextResponse)
def auth_topic(form: Form, db: Db, request: Request) -> PlainTextResponse:
    """Publish (write) or bind (read) with one routing key on a topic exchange."""
    who = _principal(db, form.get("username", ""))

    def may_submit_to(endpoint_id: str) -> bool:
        endpoint = db.get(EndpointRow, endpoint_id)
        return who is not None and endpoint is not None and policy.may_submit(who, endpoint)

    allowed = who is not None and _in_fabric_vhost(request, form) and topic_allowed(
        who, form.get("name", ""), form.get("permission", ""), form.get("routing_key", ""),
        load_topology(), may_submit_to)
    return _answer(allowed, "topic", form)
