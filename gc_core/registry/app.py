"""The registry's HTTP API: thin routes over ``store``."""

from __future__ import annotations

import binascii
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session

from gc_core.errors import NotFound
from gc_core.registry import store
from gc_core.registry.db import open_database
from gc_core.registry.ledger import Ledger
from gc_core.registry.schemas import (
    EndpointIn,
    EndpointOut,
    EndpointStatus,
    FunctionIn,
    FunctionOut,
    TaskBatchIn,
    TaskOut,
)
from gc_core.settings import DEFAULT_BROKER_URL
from gc_core.topology import load_topology

__all__ = ["RegistrySettings", "create_app"]


class RegistrySettings(BaseModel):
    """How the registry runs: its database, and the broker its ledger consumes from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    db_url: str = "sqlite:///registry.db"
    broker_url: str = DEFAULT_BROKER_URL
    ledger: bool = True


def _db(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


Db = Annotated[Session, Depends(_db)]


def create_app(settings: RegistrySettings) -> FastAPI:
    """Build the app; the database opens and the ledger starts with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.sessions = open_database(settings.db_url)
        ledger = app.state.ledger = None
        if settings.ledger:
            ledger = Ledger(broker_url=settings.broker_url, topology=load_topology(),
                            sessions=app.state.sessions)
            ledger.start()
            app.state.ledger = ledger
        yield
        if ledger is not None:
            ledger.stop()

    app = FastAPI(title="gc-fabric registry", version="1", lifespan=lifespan)

    @app.exception_handler(NotFound)
    async def not_found(_request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(binascii.Error)
    async def bad_base64(_request: Request, exc: binascii.Error) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": f"payload_b64 is not base64: {exc}"})

    @app.get("/health")
    def health(request: Request) -> dict[str, Any]:
        ledger = request.app.state.ledger
        return {"status": "ok",
                "ledger": "off" if ledger is None else
                          "consuming" if ledger.connected else "waiting for the broker"}

    @app.post("/functions", response_model=FunctionOut)
    def register_function(body: FunctionIn, session: Db) -> FunctionOut:
        return store.register_function(session, body)

    @app.get("/functions/{function_id}", response_model=FunctionOut)
    def get_function(function_id: str, session: Db) -> FunctionOut:
        return store.get_function(session, function_id)

    @app.post("/endpoints", response_model=EndpointOut)
    def create_endpoint(body: EndpointIn, session: Db) -> EndpointOut:
        return store.create_endpoint(session, body)

    @app.get("/endpoints", response_model=list[EndpointOut])
    def list_endpoints(session: Db) -> list[EndpointOut]:
        return store.list_endpoints(session)

    @app.get("/endpoints/{endpoint_id}", response_model=EndpointOut)
    def get_endpoint(endpoint_id: str, session: Db) -> EndpointOut:
        return store.get_endpoint(session, endpoint_id)

    @app.get("/endpoints/{endpoint_id}/status", response_model=EndpointStatus)
    def get_endpoint_status(endpoint_id: str, session: Db) -> EndpointStatus:
        return store.endpoint_status(session, endpoint_id)

    @app.get("/endpoints/{endpoint_id}/task-counts", response_model=dict[str, int])
    def get_task_counts(endpoint_id: str, session: Db) -> dict[str, int]:
        return store.task_counts(session, endpoint_id)

    @app.get("/tasks/{task_id}", response_model=TaskOut)
    def get_task(task_id: str, session: Db) -> TaskOut:
        return store.get_tasks(session, [task_id])[0]

    @app.post("/tasks/batch", response_model=list[TaskOut])
    def get_task_batch(body: TaskBatchIn, session: Db) -> list[TaskOut]:
        return store.get_tasks(session, body.task_ids)

    @app.get("/task-groups/{task_group_id}/tasks", response_model=list[TaskOut])
    def list_group_tasks(task_group_id: str, session: Db) -> list[TaskOut]:
        return store.list_group_tasks(session, task_group_id)

    return app
