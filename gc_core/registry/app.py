"""The registry's HTTP API: thin routes over ``store``."""

from __future__ import annotations

import binascii
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from gc_core.errors import RegistryError
from gc_core.registry import actions, broker_auth, identity, listing_api, store, ui
from gc_core.registry.db import describe_database, open_database
from gc_core.registry.deps import Caller, Db
from gc_core.registry.identity import Principal
from gc_core.registry.ledger import Ledger, Retention
from gc_core.registry.ledger_rules import describe
from gc_core.registry.metrics import instrument
from gc_core.registry.vhost_claim import DatabaseClaim
from gc_core.registry_api.schemas import (
    EndpointIn,
    EndpointOut,
    EndpointPolicy,
    EndpointStatus,
    FunctionIn,
    FunctionOut,
    FunctionSharing,
    IssuedToken,
    TaskBatchIn,
    TaskCheckIn,
    TaskCheckOut,
    TaskOut,
    TokenIn,
    TokenOut,
    WhoAmI,
)
from gc_core.settings import DEFAULT_BROKER_URL
from gc_core.topology import load_topology

__all__ = ["DEFAULT_MAX_TOKEN_LIFETIME", "RegistrySettings", "create_app"]

#: Longest life, in seconds, of a token issued through the API (90 days): a leaked token
#: dies by itself, and so do the tokens it minted.
DEFAULT_MAX_TOKEN_LIFETIME = 90 * 86400
#: What a broker secret may be made of: it stands in the broker's ``auth_http`` URLs.
BROKER_SECRET_PATTERN = r"[A-Za-z0-9_\-]{16,256}"


class RegistrySettings(BaseModel):
    """How the registry runs: its database, and the broker its ledger consumes from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    db_url: str = "sqlite:///registry.db"
    broker_url: str = DEFAULT_BROKER_URL
    ledger: bool = True
    #: ``tokens``: every request needs a token and policies hold. ``open``: identities are
    #: claimed, not proven — for a laptop demo on a broker nobody else can reach.
    auth: Literal["open", "tokens"] = Field(default="tokens")
    #: Results larger than this many bytes are not kept in the ledger (None: no cap).
    result_size_limit: int | None = Field(default=Retention.size_limit, ge=0)
    #: Seconds the ledger keeps a result's value (None: for ever).
    result_ttl: float | None = Field(default=Retention.ttl, gt=0)
    #: Longest life, in seconds, of a token issued through the API (None: no cap). Such a
    #: token also never outlives, nor survives, the token that issued it.
    max_token_lifetime: float | None = Field(default=DEFAULT_MAX_TOKEN_LIFETIME, gt=0)
    #: What the broker presents on ``/auth/*``: the password of HTTP basic auth, which its
    #: ``auth_http.*_path`` URLs carry (``http://rabbitmq:SECRET@registry/auth/user``).
    #: None: ``/auth/*`` answers only callers on this host, which is the broker only when it
    #: runs beside the registry with no proxy in front.
    broker_auth_secret: SecretStr | None = None
    #: Whether the broker checks each message's ``user_id`` against its login, as the secured
    #: node (``broker_config/``) does. Then a tokens-mode ledger believes it, and only it, about
    #: who sent a result, heartbeat or manifest. False only for tests of a tokens-mode registry
    #: on an open broker, where the ledger then records messages as their headers say.
    broker_checks_user_id: bool = True

    @field_validator("broker_auth_secret")
    @classmethod
    def _fits_a_url(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and not re.fullmatch(BROKER_SECRET_PATTERN,
                                                   secret.get_secret_value()):
            raise ValueError("the broker auth secret must be 16 to 256 letters, digits, '_' or "
                             "'-' (it stands in the broker's auth_http URLs); make one with "
                             "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        return secret


class Refusal(BaseModel):
    """Why a request was refused."""

    detail: str


def _validation_sentence(exc: RequestValidationError) -> str:
    """``invalid request: body.args: Input should be a valid list; …``"""
    problems = [f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', '')}"
                for error in exc.errors()]
    return "invalid request: " + "; ".join(problems)


def _owner(caller: Principal, claimed: str) -> str:
    """Who owns what a caller creates: themselves, or whoever they claim on an open registry."""
    return claimed if caller is identity.ANONYMOUS else caller.name


def create_app(settings: RegistrySettings) -> FastAPI:
    """Build the app; the database opens and the ledger starts with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.sessions = open_database(settings.db_url)
        ledger = app.state.ledger = None
        if settings.ledger:
            ledger = Ledger(broker_url=settings.broker_url, topology=load_topology(),
                            sessions=app.state.sessions,
                            retention=Retention(settings.result_size_limit, settings.result_ttl),
                            # a tokens-mode registry's broker checks every sender's user_id
                            verify_senders=settings.auth == "tokens"
                            and settings.broker_checks_user_id,
                            # the vhost's ledger is this database's alone (vhost_claim.py)
                            claim=DatabaseClaim.of(app.state.sessions, settings.db_url),
                            database=describe_database(settings.db_url))
            ledger.start()
            app.state.ledger = ledger
        yield
        if ledger is not None:
            ledger.stop()

    app = FastAPI(title="gc-fabric registry", version="1", lifespan=lifespan,
                  responses={401: {"model": Refusal}, 403: {"model": Refusal},
                             404: {"model": Refusal}})
    app.state.settings = settings

    @app.exception_handler(RegistryError)
    async def refused(_request: Request, exc: RegistryError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(status_code=exc.status or 400, content={"detail": str(exc)},
                            headers=headers)

    @app.exception_handler(ValueError)
    async def bad_value(_request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # One sentence naming each bad field, as every other refusal gives, not a JSON tree.
        return JSONResponse(status_code=422, content={"detail": _validation_sentence(exc)})

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(DisconnectionError)
    @app.exception_handler(PoolTimeout)
    async def database_away(_request: Request, exc: Exception) -> JSONResponse:
        # Away, restarting, locked or full: a client (an agent too) tries again later.
        return JSONResponse(status_code=503, headers={"Retry-After": "5"}, content={
            "detail": f"the registry's database ({describe_database(settings.db_url)}) does not "
                      f"answer ({describe(exc)}); try again shortly"})

    @app.exception_handler(binascii.Error)
    async def bad_base64(_request: Request, exc: binascii.Error) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": f"payload_b64 is not base64: {exc}"})

    @app.get("/health")
    def health(request: Request) -> JSONResponse:
        # 503 when the ledger cannot recover by itself (its writer ended): nothing is recorded
        # and dead letters reach nobody until the registry restarts. A broker that is away
        # is waited for, and reconnected to, without help.
        ledger = request.app.state.ledger
        failure = None if ledger is None else ledger.failure
        if failure is not None:
            # The broker refused the ledger for good: another database holds its vhost, say.
            return JSONResponse(status_code=503, content={"status": "failing",
                                                          "ledger": f"stopped: {failure}"})
        if ledger is not None and not ledger.writing:
            return JSONResponse(status_code=503, content={
                "status": "failing",
                "ledger": "stopped: its writer thread has ended, so nothing is recorded; "
                          "restart the registry"})
        return JSONResponse({"status": "ok",
                             "ledger": "off" if ledger is None else
                                       ledger.database_problem or (
                                           "consuming" if ledger.connected else
                                           "waiting for the broker")})

    @app.get("/whoami", response_model=WhoAmI)
    def whoami(caller: Caller) -> WhoAmI:
        return WhoAmI(name=caller.name, kind=caller.kind, admin=caller.admin,
                      groups=sorted(caller.groups), endpoint_id=caller.endpoint_id,
                      token_id=caller.token_id, auth=settings.auth)

    @app.post("/tokens", response_model=IssuedToken)
    def issue_token(body: TokenIn, session: Db, caller: Caller) -> IssuedToken:
        if caller.is_agent or caller is identity.ANONYMOUS:
            raise RegistryError("only a user's own token can issue tokens; log in first",
                                status=403)
        return identity.issue_token(session, caller.name, label=body.label,
                                    lifetime=body.lifetime, endpoint_id=body.endpoint_id,
                                    parent=caller.token_id,
                                    max_lifetime=settings.max_token_lifetime)

    @app.get("/tokens", response_model=list[TokenOut])
    def list_tokens(session: Db, caller: Caller) -> list[TokenOut]:
        return identity.list_tokens(session, None if caller.admin else caller.name)

    @app.delete("/tokens/{token_id}", response_model=TokenOut)
    def revoke_token(token_id: str, session: Db, caller: Caller) -> TokenOut:
        return identity.revoke_token(session, token_id, by=caller)

    @app.post("/functions", response_model=FunctionOut)
    def register_function(body: FunctionIn, session: Db, caller: Caller) -> FunctionOut:
        return store.register_function(session, body, owner=_owner(caller, body.owner))

    @app.get("/functions/{function_id}", response_model=FunctionOut)
    def get_function(function_id: str, session: Db, caller: Caller) -> FunctionOut:
        return store.get_function(session, function_id, caller)

    @app.delete("/functions/{function_id}", response_model=FunctionOut)
    def delete_function(function_id: str, session: Db, caller: Caller) -> FunctionOut:
        return store.delete_function(session, function_id, caller)

    @app.put("/functions/{function_id}/sharing", response_model=FunctionOut)
    def share_function(function_id: str, body: FunctionSharing, session: Db,
                       caller: Caller) -> FunctionOut:
        return store.set_function_sharing(session, function_id, body, caller)

    @app.post("/endpoints", response_model=EndpointOut)
    def create_endpoint(body: EndpointIn, session: Db, caller: Caller) -> EndpointOut:
        return store.create_endpoint(session, body, owner=_owner(caller, body.owner))

    @app.get("/endpoints", response_model=list[EndpointOut])
    def list_endpoints(session: Db, caller: Caller) -> list[EndpointOut]:
        return store.list_endpoints(session, caller)

    @app.get("/endpoints/{endpoint_id}", response_model=EndpointOut)
    def get_endpoint(endpoint_id: str, session: Db, caller: Caller) -> EndpointOut:
        return store.get_endpoint(session, endpoint_id, caller)

    @app.delete("/endpoints/{endpoint_id}", response_model=EndpointOut)
    def delete_endpoint(endpoint_id: str, session: Db, caller: Caller) -> EndpointOut:
        return store.delete_endpoint(session, endpoint_id, caller)

    @app.put("/endpoints/{endpoint_id}/policy", response_model=EndpointOut)
    def set_endpoint_policy(endpoint_id: str, body: EndpointPolicy, session: Db,
                            caller: Caller) -> EndpointOut:
        return store.set_endpoint_policy(session, endpoint_id, body, caller)

    @app.get("/endpoints/{endpoint_id}/functions", response_model=list[FunctionOut])
    def allowed_functions(endpoint_id: str, session: Db, caller: Caller) -> list[FunctionOut]:
        return store.allowed_functions(session, endpoint_id, caller)

    @app.post("/endpoints/{endpoint_id}/check-task", response_model=TaskCheckOut)
    def check_task(endpoint_id: str, body: TaskCheckIn, session: Db,
                   caller: Caller) -> TaskCheckOut:
        reason = store.authorize_task(session, endpoint_id, body.user, body.function_id,
                                      body.content_type, caller, body.on_behalf_of)
        return TaskCheckOut(allowed=reason is None, reason=reason or "")

    @app.get("/endpoints/{endpoint_id}/status", response_model=EndpointStatus)
    def get_endpoint_status(endpoint_id: str, session: Db, caller: Caller) -> EndpointStatus:
        store.get_endpoint(session, endpoint_id, caller)
        return store.endpoint_status(session, endpoint_id)

    @app.get("/endpoints/{endpoint_id}/task-counts", response_model=dict[str, int])
    def get_task_counts(endpoint_id: str, session: Db, caller: Caller) -> dict[str, int]:
        store.get_endpoint(session, endpoint_id, caller)
        return store.task_counts(session, endpoint_id)

    @app.get("/tasks/{task_id}", response_model=TaskOut)
    def get_task(task_id: str, session: Db, caller: Caller) -> TaskOut:
        return store.get_tasks(session, [task_id], caller)[0]

    @app.post("/tasks/batch", response_model=list[TaskOut])
    def get_task_batch(body: TaskBatchIn, session: Db, caller: Caller) -> list[TaskOut]:
        return store.get_tasks(session, body.task_ids, caller)

    @app.get("/task-groups/{task_group_id}/tasks", response_model=list[TaskOut])
    def list_group_tasks(task_group_id: str, session: Db, caller: Caller) -> list[TaskOut]:
        return store.list_group_tasks(session, task_group_id, caller)

    app.include_router(actions.router)
    app.include_router(broker_auth.router)
    instrument(app)  # /metrics, and every request timed
    app.include_router(listing_api.router)
    app.include_router(ui.router)
    return app
