"""FastAPI dependencies every registry route shares: a database session and the caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from gc_core.errors import NotAuthenticated
from gc_core.registry import identity
from gc_core.registry.identity import ANONYMOUS, Principal

__all__ = ["Caller", "Db"]

_bearer = HTTPBearer(auto_error=False, description="A token from `gc-registry token create` "
                                                   "or `gc-client login`.")


def _db(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


Db = Annotated[Session, Depends(_db)]


def _caller(request: Request, db: Db,
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
            ) -> Principal:
    if credentials is not None:
        return identity.authenticate(db, credentials.credentials)
    if request.app.state.settings.auth == "open":
        return ANONYMOUS
    raise NotAuthenticated("this registry needs a token: run `gc-client login` (or set "
                           "GC_TOKEN) with a token your administrator issued with "
                           "`gc-registry token create`")


#: The authenticated principal (``ANONYMOUS`` on an open registry without a token).
Caller = Annotated[Principal, Depends(_caller)]
