"""Who is asking: users, service accounts, groups, and the tokens they authenticate with.

Plain functions over a SQLAlchemy session, like ``store``; the admin CLI and the HTTP API
both call them. A token's secret is shown once, when issued: only its SHA-256 is stored
(tokens are 256 random bits, so an unsalted hash is as strong as the token).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Literal

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from gc_core.errors import Forbidden, NotAuthenticated, NotFound, RegistryError
from gc_core.registry.db import EndpointRow, GroupMemberRow, GroupRow, TokenRow, UserRow
from gc_core.registry_api.schemas import NAME_PATTERN, IssuedToken, TokenOut, UserOut
from gc_core.settings import AGENT_PREFIX

__all__ = [
    "AGENT_PREFIX",
    "ANONYMOUS",
    "NAME_PATTERN",
    "Principal",
    "add_member",
    "authenticate",
    "authenticate_token_id",
    "create_group",
    "create_user",
    "get_user",
    "issue_token",
    "list_tokens",
    "list_users",
    "principal_of_user",
    "remove_member",
    "revoke_token",
]

_TOKEN_PREFIX = "gct_"

UserKind = Literal["user", "service"]


@dataclass(frozen=True)
class Principal:
    """The identity behind a request: a user, a service account, or an endpoint's agent."""

    name: str
    kind: Literal["user", "service", "agent", "anonymous"]
    groups: frozenset[str] = field(default_factory=frozenset)
    admin: bool = False
    #: For an agent: the endpoint it serves; ``name`` is then ``endpoint-<id>``.
    endpoint_id: str | None = None
    #: For an agent: the endpoint owner, whose rights it has over that endpoint.
    owner: str | None = None
    #: The token the request came with, so a client can revoke its own on logout.
    token_id: str | None = None

    @property
    def is_agent(self) -> bool:
        return self.kind == "agent"


#: Who an open-mode registry (the demo's) takes an unauthenticated caller to be: identities
#: are claimed, not proven, so no policy can hold and everyone may do everything.
ANONYMOUS = Principal(name="anonymous", kind="anonymous", admin=True)


def create_user(db: Session, name: str, *, kind: UserKind = "user", admin: bool = False) -> UserOut:
    """Add a user or a service account."""
    if not re.fullmatch(NAME_PATTERN, name) or name.startswith(AGENT_PREFIX):
        raise ValueError(f"user name {name!r} is not allowed: use 1-64 letters, digits, '_' or "
                         f"'-', starting with a letter or digit, and not {AGENT_PREFIX!r}…")
    if db.get(UserRow, name) is not None:
        raise ValueError(f"user {name!r} already exists")
    row = UserRow(name=name, kind=kind, admin=admin, created=time.time())
    db.add(row)
    db.commit()
    return _user_out(db, row)


def get_user(db: Session, name: str) -> UserOut:
    """One user with their groups."""
    return _user_out(db, _user_row(db, name))


def list_users(db: Session) -> list[UserOut]:
    """Every user and service account, by name."""
    return [_user_out(db, row) for row in db.scalars(select(UserRow).order_by(UserRow.name))]


def create_group(db: Session, name: str) -> None:
    """Add an (empty) group."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"group name {name!r} is not allowed: use 1-64 letters, digits, '_' "
                         "or '-', starting with a letter or digit")
    if db.get(GroupRow, name) is not None:
        raise ValueError(f"group {name!r} already exists")
    db.add(GroupRow(name=name, created=time.time()))
    db.commit()


def add_member(db: Session, group: str, user: str) -> None:
    """Put a user in a group (idempotent)."""
    _user_row(db, user)
    if db.get(GroupRow, group) is None:
        raise NotFound(f"no group {group!r}; create it with `gc-registry group create {group}`")
    if db.get(GroupMemberRow, (group, user)) is None:
        db.add(GroupMemberRow(group=group, user=user))
        db.commit()


def remove_member(db: Session, group: str, user: str) -> None:
    """Take a user out of a group (idempotent)."""
    db.execute(delete(GroupMemberRow).where(GroupMemberRow.group == group,
                                            GroupMemberRow.user == user))
    db.commit()


def issue_token(db: Session, user: str, *, label: str = "", lifetime: float | None = None,
                endpoint_id: str | None = None, parent: str | None = None,
                max_lifetime: float | None = None) -> IssuedToken:
    """A new token for ``user`` (for an agent: scoped to ``endpoint_id``, which ``user`` must
    own). ``lifetime`` in seconds; None means the longest allowed.

    A token issued by another (``parent``, its token id) never outlives it and is revoked
    with it; ``max_lifetime`` caps the lifetime (the registry's setting for tokens issued
    through its API). Without either the token lasts until revoked (an administrator's).

    Raises:
        RegistryError: (422) ``lifetime`` is longer than the cap or than the parent has left.
    """
    _user_row(db, user)
    if endpoint_id is not None:
        endpoint = db.get(EndpointRow, endpoint_id)
        if endpoint is None:
            raise NotFound(f"no endpoint {endpoint_id} is registered")
        if endpoint.owner != user:
            raise Forbidden(f"only the owner of endpoint {endpoint_id} ({endpoint.owner}) may "
                            "issue its agent token")
    now = time.time()
    parent_row = None if parent is None else db.get(TokenRow, parent)
    expires = _expiry(now, lifetime, max_lifetime,
                      None if parent_row is None else parent_row.expires)
    secret = _TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = TokenRow(token_id=secrets.token_hex(6), token_hash=_hash(secret), user=user,
                   endpoint_id=endpoint_id, label=label, created=now, expires=expires,
                   parent=parent)
    db.add(row)
    db.commit()
    principal = AGENT_PREFIX + endpoint_id if endpoint_id else user
    return IssuedToken(token=secret, principal=principal, **_token_out(row).model_dump())


def _expiry(now: float, lifetime: float | None, cap: float | None,
            parent_expires: float | None) -> float | None:
    """When a new token expires: as asked, else as late as ``cap`` and the parent allow."""
    if lifetime is not None and cap is not None and lifetime > cap:
        raise RegistryError(f"a token may live at most {_span(cap)} on this registry (its "
                            f"administrator's cap), not {_span(lifetime)}; ask for less",
                            status=422)
    if lifetime is not None and parent_expires is not None and now + lifetime > parent_expires:
        raise RegistryError(f"the token asking expires at {_when(parent_expires)}, and a token "
                            f"it issues cannot outlive it: ask for at most "
                            f"{_span(max(parent_expires - now, 0))}, or log in with a "
                            "longer-lived token", status=422)
    limits = [t for t in (None if lifetime is None else now + lifetime,
                          None if cap is None else now + cap, parent_expires) if t is not None]
    return min(limits) if limits else None


def list_tokens(db: Session, user: str | None = None) -> list[TokenOut]:
    """Tokens (never their secrets), newest first; all of them, or one user's."""
    query = select(TokenRow).order_by(TokenRow.created.desc())
    if user is not None:
        query = query.where(TokenRow.user == user)
    return [_token_out(row) for row in db.scalars(query)]


def revoke_token(db: Session, token_id: str, *, by: Principal | None = None) -> TokenOut:
    """Revoke a token now, and every token it issued (theirs too, and so on down);
    ``by`` (when given) must own it or be an admin."""
    row = db.get(TokenRow, token_id)
    if row is None or (by is not None and not by.admin and row.user != by.name):
        raise NotFound(f"no token {token_id} of yours; `gc-client tokens` lists them")
    now = time.time()
    for revoked in [row, *_descendants(db, token_id)]:
        if revoked.revoked is None:
            revoked.revoked = now
    db.commit()
    return _token_out(row)


def _descendants(db: Session, token_id: str) -> list[TokenRow]:
    """Every token issued by ``token_id``, by its children, and so on."""
    found: list[TokenRow] = []
    parents = [token_id]
    while parents:
        children = list(db.scalars(select(TokenRow).where(TokenRow.parent.in_(parents))))
        found.extend(children)
        parents = [child.token_id for child in children]
    return found


def authenticate(db: Session, token: str, *, now: float | None = None) -> Principal:
    """The principal a token stands for, or ``NotAuthenticated`` saying what is wrong with it
    and what to do."""
    row = db.scalars(select(TokenRow).where(TokenRow.token_hash == _hash(token))).first()
    if row is None:
        raise NotAuthenticated("the registry does not know this token; log in again with "
                               "`gc-client login` and a token your administrator issued")
    return _principal_of_token(db, row, now)


def authenticate_token_id(db: Session, token_id: str) -> Principal:
    """The principal the token ``token_id`` stands for, checked as :func:`authenticate`
    checks a token (a dashboard session keeps the id, never the token)."""
    row = db.get(TokenRow, token_id)
    if row is None:
        raise NotAuthenticated(f"token {token_id} no longer exists; sign in again")
    return _principal_of_token(db, row, None)


def _principal_of_token(db: Session, row: TokenRow, now: float | None) -> Principal:
    if row.revoked is not None:
        raise NotAuthenticated(f"token {row.token_id} was revoked at {_when(row.revoked)}; ask "
                               "your administrator for a new one and run `gc-client login`")
    if row.expires is not None and row.expires <= (now or time.time()):
        raise NotAuthenticated(f"token {row.token_id} expired at {_when(row.expires)}; ask your "
                               "administrator for a new one and run `gc-client login`")
    if row.endpoint_id is not None:
        return Principal(name=AGENT_PREFIX + row.endpoint_id, kind="agent",
                         endpoint_id=row.endpoint_id, owner=row.user, token_id=row.token_id)
    user = principal_of_user(db, row.user)
    if user is None:
        raise NotAuthenticated(f"token {row.token_id} belongs to a user who no longer exists")
    return replace(user, token_id=row.token_id)


def principal_of_user(db: Session, name: str) -> Principal | None:
    """A registered user or service account as a principal, or None."""
    row = db.get(UserRow, name)
    if row is None:
        return None
    return Principal(name=row.name, kind=row.kind,  # type: ignore[arg-type]
                     groups=frozenset(_groups_of(db, name)), admin=row.admin)


def _groups_of(db: Session, user: str) -> list[str]:
    return list(db.scalars(select(GroupMemberRow.group).where(GroupMemberRow.user == user)
                           .order_by(GroupMemberRow.group)))


def _user_row(db: Session, name: str) -> UserRow:
    row = db.get(UserRow, name)
    if row is None:
        raise NotFound(f"no user {name!r}; create it with `gc-registry user create {name}`")
    return row


def _user_out(db: Session, row: UserRow) -> UserOut:
    return UserOut(name=row.name, kind=row.kind, admin=row.admin,  # type: ignore[arg-type]
                   groups=_groups_of(db, row.name), created=row.created)


def _token_out(row: TokenRow) -> TokenOut:
    return TokenOut(token_id=row.token_id, user=row.user, endpoint_id=row.endpoint_id,
                    label=row.label, created=row.created, expires=row.expires,
                    revoked=row.revoked, parent=row.parent)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _span(seconds: float) -> str:
    """``90 days``, ``2 hours``, ``45 seconds``: whole units, rounded down."""
    units = (("day", 86400), ("hour", 3600), ("minute", 60))
    unit, size = next(((u, n) for u, n in units if seconds >= n), ("second", 1))
    count = int(seconds // size)
    return f"{count} {unit}{'' if count == 1 else 's'}"
