"""Limits before parsing: a request body is read only from a known caller, and only up to a size.

FastAPI reads and parses a request's body before it solves the route's dependencies (the API key among
them), so on its own the API reads, holds and parses whatever body anyone sends. ``BodyGate`` (pure ASGI,
in front of the routes) therefore, for a request that announces a body:

1. under ``/api/``: answers 401 unless it shows a valid API key, before any byte of the body is read;
2. answers 413 when its Content-Length is over ``api_max_body_bytes``, before any byte is read;
3. counts the bytes as the route reads them (chunked bodies have no Content-Length) and answers 413
   once they pass the limit.

The first two close the connection (``Connection: close``), so an unread body does not hold it. All three
are RFC 9457 problem details like every other error. (FastAPI's own ``max_body_size`` would do 2 and 3,
but answers the Content-Length case in plain text and replaces any earlier answer, the 401 included.)

The caller found in step 1 goes into ``scope["state"]["principal"]``: a refusal answered later (an
unparseable body, say) is then audited like every other refusal (``api.problems``).
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps_types import Principal
from api.problems import PROBLEM_MEDIA_TYPE, TYPE_BASE
from api.users import authenticate
from radialog.registry import Registry

API_PREFIX = "/api/"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes the limit; FastAPI lets HTTP errors through unchanged,
    so the problem handlers answer it (413) like any other."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over {limit} bytes")


def has_body(headers: Headers) -> bool:
    """A body follows the head: a Content-Length other than 0, or a Transfer-Encoding (chunked)."""
    length = headers.get("content-length")
    return "transfer-encoding" in headers or (length is not None and length.strip() != "0")


def content_length(headers: Headers) -> int | None:
    try:
        return int(headers.get("content-length", ""))
    except ValueError:
        return None


def presented_key(headers: Headers) -> str | None:
    """The key as ``api.deps.current_user`` reads it; None when none, or two different ones, were sent."""
    bearer = None
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        bearer = credentials.strip()
    header_key = headers.get("x-api-key") or None
    if bearer and header_key and bearer != header_key:
        return None
    return bearer or header_key


def _problem(scope: Scope, status: int, slug: str, title: str, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"type": TYPE_BASE + slug, "title": title, "status": status, "detail": detail, "instance": scope["path"]},
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers={"Connection": "close", **headers},
    )


class BodyGate:
    """ASGI middleware: the key before the body (``/api/``), then the body's size (everywhere)."""

    def __init__(self, app: ASGIApp, registry: Registry, max_body_bytes: int) -> None:
        self.app = app
        self.registry = registry
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not has_body(headers):
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(API_PREFIX):
            key = presented_key(headers)
            principal = await run_in_threadpool(self._principal, key) if key else None
            if principal is None:
                await _problem(
                    scope,
                    401,
                    "unauthenticated",
                    "Unauthorized",
                    "a request with a body needs a valid API key ('Authorization: Bearer <key>' or "
                    "'X-API-Key'); the body was not read",
                    **{"WWW-Authenticate": "Bearer"},
                )(scope, receive, send)
                return
            scope.setdefault("state", {})["principal"] = principal
        length = content_length(headers)
        if length is not None and length > self.max_body_bytes:
            await _problem(
                scope,
                413,
                "content-too-large",
                "Content Too Large",
                f"the request body ({length} bytes) is over {self.max_body_bytes} bytes; it was not read",
            )(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        read = 0

        async def counted() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        return counted

    def _principal(self, key: str) -> Principal | None:
        with self.registry.session() as session:
            user = authenticate(session, key)
            return None if user is None else Principal(name=user.name, role=user.role)
