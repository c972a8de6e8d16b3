"""The registry's tables (SQLAlchemy 2) and how to open the database."""

from __future__ import annotations

import socket
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    make_url,
    select,
)
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from gc_core.errors import RegistryError
from gc_core.protocol import MAX_LABEL_LENGTH, MAX_NAME_LENGTH
from gc_core.registry import migrations

__all__ = ["ActionRow", "Base", "DatabaseIdentityRow", "EarlyResultRow", "EndpointRow",
           "FunctionRow", "GroupMemberRow", "GroupRow", "TaskRow", "TokenRow", "UserRow",
           "database_id", "describe_database", "open_database"]


class Base(DeclarativeBase):
    """Declarative base of every registry table."""


class FunctionRow(Base):
    """A registered function: its serialized bytes, source and the hash we dedupe on."""

    __tablename__ = "functions"

    function_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str] = mapped_column(String(200))
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    content_type: Mapped[str] = mapped_column(String(100))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    source: Mapped[str | None] = mapped_column(Text)
    python_version: Mapped[str] = mapped_column(String(40))
    serializer: Mapped[str] = mapped_column(String(100))
    created: Mapped[float] = mapped_column(Float)
    #: private (owner only), groups (members of ``shared_groups``) or public.
    sharing: Mapped[str] = mapped_column(String(10), default="private")
    shared_groups: Mapped[list[str]] = mapped_column(JSON, default=list)


class EndpointRow(Base):
    """A registered endpoint and what its last heartbeat said."""

    __tablename__ = "endpoints"

    endpoint_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float | None] = mapped_column(Float)
    heartbeat_json: Mapped[str | None] = mapped_column(Text)
    #: private (only the owner and the allowed users and groups see it) or listed (all do).
    visibility: Mapped[str] = mapped_column(String(10), default="private")
    allowed_users: Mapped[list[str]] = mapped_column(JSON, default=list)
    allowed_groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: None: any function its users may use; a list: only these function ids.
    allowed_functions: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    #: None: the agent's own allow-list decides; a list: only these serializer content types.
    allowed_serializers: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)


class TaskRow(Base):
    """One task in the ledger: who sent it where, its state, timings and result."""

    __tablename__ = "tasks"
    __table_args__ = (Index("ix_tasks_group", "task_group_id"),)

    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_group_id: Mapped[str] = mapped_column(String(64))
    endpoint_id: Mapped[str] = mapped_column(String(64), default="")
    function_id: Mapped[str] = mapped_column(String(64), default="")
    user: Mapped[str] = mapped_column(String(200), default="")
    # Columns hold whatever the protocol lets a message carry (MAX_NAME_LENGTH,
    # MAX_LABEL_LENGTH): PostgreSQL refuses a longer value, and the batch with it.
    #: The end user a service account submitted for ("" when users submit for themselves).
    on_behalf_of: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH), default="")
    status: Mapped[str] = mapped_column(String(20))
    submitted: Mapped[float | None] = mapped_column(Float)
    received: Mapped[float | None] = mapped_column(Float)
    started: Mapped[float | None] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str] = mapped_column(String(MAX_LABEL_LENGTH), default="")
    content_type: Mapped[str] = mapped_column(String(MAX_LABEL_LENGTH), default="")
    result: Mapped[bytes | None] = mapped_column(LargeBinary)
    error_json: Mapped[str | None] = mapped_column(Text)
    stdout: Mapped[str] = mapped_column(Text, default="")
    stderr: Mapped[str] = mapped_column(Text, default="")
    #: When the ledger recorded the final state (a dead letter has no agent timings).
    recorded: Mapped[float | None] = mapped_column(Float, index=True)
    #: Why the result's value is not kept: larger than the cap, or past its time to live.
    result_note: Mapped[str] = mapped_column(Text, default="")


#: A user's tasks newest first, as ``GET /tasks`` pages them (``listing.py``): each row has
#: a submission time from its manifest, or else the time its result was recorded.
Index("ix_tasks_user_time", TaskRow.user, func.coalesce(TaskRow.submitted, TaskRow.recorded),
      TaskRow.task_id)


class EarlyResultRow(Base):
    """A result (or dead letter) that reached the ledger before any manifest named its task:
    it waits here, unchecked, until one does (see ``ledger.py``)."""

    __tablename__ = "early_results"

    early_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(64), index=True)
    #: The AMQP ``user_id`` the broker checked (an AMQP short string: 255 bytes at most).
    sender: Mapped[str] = mapped_column(String(255), index=True)
    #: A task message the broker dead-lettered, rather than an agent's result.
    dead: Mapped[bool] = mapped_column(Boolean)
    #: The decoded result but its value, as JSON.
    result_json: Mapped[str] = mapped_column(Text)
    #: Its value; None when larger than the ledger keeps (``payload_size`` says how large).
    payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    payload_size: Mapped[int] = mapped_column(Integer)
    arrived: Mapped[float] = mapped_column(Float, index=True)


class DatabaseIdentityRow(Base):
    """The database's own id, made once by a migration. Registries that consume one broker
    vhost's ledger must write to one database: each claims the vhost with this id."""

    __tablename__ = "database_identity"

    #: Always 1: the table has one row.
    singleton: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    database_id: Mapped[str] = mapped_column(String(36))
    created: Mapped[float] = mapped_column(Float)


class ActionRow(Base):
    """A Flows-style action: one task submitted through ``/actions/run``, until released."""

    __tablename__ = "actions"
    __table_args__ = (UniqueConstraint("creator", "request_id", name="uq_actions_request"),)

    #: The task id of the action's one task.
    action_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    #: The caller's id for the request: a repeat with the same id gets the same action.
    request_id: Mapped[str] = mapped_column(String(200))
    #: SHA-256 of the request, to refuse a repeated request_id with different content.
    request_hash: Mapped[str] = mapped_column(String(64))
    creator: Mapped[str] = mapped_column(String(200))
    endpoint_id: Mapped[str] = mapped_column(String(64))
    label: Mapped[str | None] = mapped_column(String(64), nullable=True)
    monitor_by: Mapped[list[str]] = mapped_column(JSON, default=list)
    manage_by: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: ISO 8601 duration after completion when the action is forgotten.
    release_after: Mapped[str] = mapped_column(String(40))
    created: Mapped[float] = mapped_column(Float)
    cancel_requested: Mapped[float | None] = mapped_column(Float, nullable=True)
    released: Mapped[float | None] = mapped_column(Float, nullable=True)


class UserRow(Base):
    """A person or a service account (a science gateway that submits for its own users)."""

    __tablename__ = "users"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10), default="user")  # user | service
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[float] = mapped_column(Float)


class TokenRow(Base):
    """A bearer token: only its SHA-256 is kept; the secret is shown once, when issued."""

    __tablename__ = "tokens"

    token_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    #: The user the token acts as; for an agent token, the endpoint's owner.
    user: Mapped[str] = mapped_column(ForeignKey("users.name", ondelete="CASCADE"), index=True)
    #: Set for an agent's token: it may act for this endpoint only.
    endpoint_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    created: Mapped[float] = mapped_column(Float)
    expires: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: The token that issued this one (None: issued at login or by an admin); revoking it
    #: revokes this one too.
    parent: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)


class AgentHeartbeatRow(Base):
    """The last heartbeat of each agent of an endpoint: several hosts may each run one (the
    endpoint's status sums theirs). Rows of agents long gone are pruned as heartbeats come."""

    __tablename__ = "agent_heartbeats"

    endpoint_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    #: ``hostname:pid``, as the heartbeat names its agent.
    agent: Mapped[str] = mapped_column(String(MAX_LABEL_LENGTH + 21), primary_key=True)
    last_seen: Mapped[float] = mapped_column(Float)
    heartbeat_json: Mapped[str] = mapped_column(Text)


class UiSessionRow(Base):
    """A signed-in dashboard browser, kept here so that every registry of this database
    knows it (several behind one address) and a restart keeps it."""

    __tablename__ = "ui_sessions"

    #: The SHA-256 of the session id the browser's cookie holds: the id itself is not kept.
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: The token it signed in with, checked again on every request; None on an open
    #: registry, where nobody proves anything.
    token_id: Mapped[str | None] = mapped_column(
        ForeignKey("tokens.token_id", ondelete="CASCADE"), nullable=True)
    #: What every form of the session must send back (the cookie alone is not enough).
    csrf: Mapped[str] = mapped_column(String(64))
    last_used: Mapped[float] = mapped_column(Float, index=True)


class GroupRow(Base):
    """A named set of users that policies can name."""

    __tablename__ = "groups"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created: Mapped[float] = mapped_column(Float)


class GroupMemberRow(Base):
    """One user's membership of one group."""

    __tablename__ = "group_members"

    group: Mapped[str] = mapped_column(ForeignKey("groups.name", ondelete="CASCADE"),
                                       primary_key=True)
    user: Mapped[str] = mapped_column(ForeignKey("users.name", ondelete="CASCADE"),
                                      primary_key=True)


def open_database(url: str) -> sessionmaker[Any]:
    """Connect, migrate the schema to the newest revision, and return a session factory.

    Raises:
        RegistryError: the URL cannot be used, or the database cannot be reached (the
            message names it without its password).
    """
    try:
        engine = _make_engine(url)
        migrations.upgrade(engine)
    except (ArgumentError, DBAPIError) as exc:
        reason = exc.orig if isinstance(exc, DBAPIError) else exc
        raise RegistryError(f"cannot open the registry database at {_shown(url)}: "
                            f"{' '.join(str(reason).split())}") from exc
    return sessionmaker(engine, expire_on_commit=False)


def database_id(sessions: sessionmaker[Any]) -> str:
    """The id the database got once, when it was migrated (see ``DatabaseIdentityRow``).

    Raises:
        RegistryError: the row is missing (someone deleted it): a new id would let
            registries of this database refuse each other, so none is made here.
    """
    with sessions() as db:
        found: str | None = db.scalars(select(DatabaseIdentityRow.database_id)).first()
    if found is None:
        raise RegistryError("the registry database has lost its id (table database_identity "
                            "is empty): restore the row, or insert one with a new uuid and "
                            "release the vhost (gc-registry release-vhost)")
    return found


def describe_database(url: str) -> str:
    """Where a database is, for people: backend, host and name; never user or password.

    >>> describe_database("postgresql+psycopg://gc:secret@db.example:5432/gc_registry")
    'postgresql database gc_registry on db.example:5432'
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "(a database URL SQLAlchemy cannot parse)"
    backend = str(parsed.get_backend_name())
    if backend == "sqlite":
        return f"sqlite database {parsed.database or ':memory:'} on {socket.gethostname()}"
    where = f"{parsed.host or 'localhost'}{f':{parsed.port}' if parsed.port else ''}"
    return f"{backend} database {parsed.database or '(default)'} on {where}"


def _shown(url: str) -> str:
    """The database URL without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(a URL SQLAlchemy cannot parse)"


def _make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets the HTTP handlers read while the ledger writes.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine
