"""FastAPI dependencies: the settings, registry and services of the app, a session, the caller.

Everything a route needs is injected from ``request.app.state`` (set by ``create_app``), so tests
build an app with their own settings and registry and nothing is global.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.deps_types import Principal
from api.problems import Problem
from api.services import Services
from api.users import Role, authenticate
from radialog.registry import Registry
from radialog.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_session(registry: Annotated[Registry, Depends(get_registry)]) -> Iterator[Session]:
    """One session per request; routes commit what they write before answering."""
    with registry.session() as session:
        yield session


def current_user(
    request: Request,
    registry: Annotated[Registry, Depends(get_registry)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_header)],
) -> Principal:
    key = bearer.credentials if bearer is not None else header_key
    if bearer is not None and header_key and header_key != bearer.credentials:
        raise Problem(
            401, "unauthenticated", "two different API keys were sent; send one", headers={"WWW-Authenticate": "Bearer"}
        )
    if not key:
        raise Problem(
            401,
            "unauthenticated",
            "send an API key as 'Authorization: Bearer <key>' or 'X-API-Key'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    with registry.session() as session:
        user = authenticate(session, key)
        if user is None:
            raise Problem(401, "unauthenticated", "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        principal = Principal(name=user.name, role=user.role)
        request.state.principal = principal  # whoever is refused from here on is audited (api.problems)
        return principal


def require(*roles: Role) -> Callable[..., Principal]:
    """A dependency that admits only ``roles``; a refusal (403) is audited by the problem handler."""
    allowed = {r.value for r in roles}

    def dependency(who: Annotated[Principal, Depends(current_user)]) -> Principal:
        if who.role not in allowed:
            raise Problem(403, "forbidden", f"role {who.role!r} may not do this; needs one of {sorted(allowed)}")
        return who

    return dependency


AnyUser = Annotated[Principal, Depends(require(Role.READER, Role.RADIOLOGIST, Role.ADMIN))]
Radiologist = Annotated[Principal, Depends(require(Role.RADIOLOGIST))]
Operator = Annotated[Principal, Depends(require(Role.RADIOLOGIST, Role.ADMIN))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
DB = Annotated[Session, Depends(get_session)]
AppSettings = Annotated[Settings, Depends(get_settings)]
AppRegistry = Annotated[Registry, Depends(get_registry)]
AppServices = Annotated[Services, Depends(get_services)]
