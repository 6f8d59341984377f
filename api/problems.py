"""RFC 9457 problem details: every error the API returns is ``application/problem+json``.

Routes raise ``Problem``; the handlers installed by ``install_handlers`` also turn FastAPI's
validation errors, Starlette's HTTP errors and unexpected exceptions into the same shape, so a
client needs one error parser. ``problem_responses`` documents them in the OpenAPI document.

Every refusal of an authenticated caller (a 4xx after the key was accepted: 403, 404, 409, 413, 422...)
is audited here, in one place, as ``denied`` (403) or ``refused`` with the status and the route, so
no route can forget it; the study id is taken as sent (``api.audit.record_refusal``).
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import audit
from radialog.logging import get_logger

log = get_logger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://radialog-node.invalid/problems/"


#: A route's OpenAPI ``responses``: status code -> its description, model and content.
Responses = dict[int | str, dict[str, Any]]


class ProblemDetail(BaseModel):
    """The RFC 9457 body; ``errors`` lists field errors of a 422, ``checks`` the readiness checks."""

    type: str = Field(..., examples=[TYPE_BASE + "study-not-found"])
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None
    checks: dict[str, str] | None = None


class Problem(Exception):
    """An error answer: ``slug`` names its type (``TYPE_BASE + slug``)."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str | None = None,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail or slug)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers or {}
        self.extra = extra or {}


def problem_response(
    request: Request,
    status: int,
    slug: str | None,
    title: str,
    detail: str | None,
    headers: Mapping[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": TYPE_BASE + slug if slug else "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **(extra or {}),
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _write_refusal(request: Request, status: int, slug: str | None) -> None:
    who = getattr(request.state, "principal", None)
    if who is None or status < 400 or status >= 500:
        return
    route = getattr(request.scope.get("route"), "path", None)
    study_id = request.scope.get("path_params", {}).get("study_id")
    try:
        with request.app.state.registry.session() as session:
            audit.record_refusal(
                session,
                who,
                "denied" if status == 403 else "refused",
                None if study_id is None else str(study_id),
                status=status,
                problem=slug,
                method=request.method,
                route=route,
            )
    except SQLAlchemyError:  # the refusal is still answered; the log says the entry is missing
        log.warning("refusal not audited: registry error", extra={"route": route, "status": status})


async def _audit_refusal(request: Request, status: int, slug: str | None) -> None:
    if getattr(request.state, "principal", None) is not None:
        await run_in_threadpool(_write_refusal, request, status, slug)


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    await _audit_refusal(request, exc.status, exc.slug)
    return problem_response(request, exc.status, exc.slug, exc.title, exc.detail, exc.headers, exc.extra)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 400 and isinstance(exc.__cause__, Exception):
        # FastAPI's answer to a body it could not parse for a reason other than JSON syntax (bytes that are
        # not UTF-8, nesting too deep): invalid input like any other, so 422 as the document says.
        errors: list[dict[str, Any]] = [
            {
                "loc": ["body"],
                "msg": f"the body could not be read as JSON ({type(exc.__cause__).__name__})",
                "type": "body_unreadable",
            }
        ]
        await _audit_refusal(request, 422, "validation-error")
        return problem_response(
            request, 422, "validation-error", "Unprocessable Content", errors[0]["msg"], extra={"errors": errors}
        )
    slug = {404: "not-found", 405: "method-not-allowed", 413: "content-too-large"}.get(status)
    await _audit_refusal(request, status, slug)
    return problem_response(request, status, slug, HTTPStatus(status).phrase, str(exc.detail), exc.headers)


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]
    detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)[:500]
    await _audit_refusal(request, 422, "validation-error")
    return problem_response(request, 422, "validation-error", "Unprocessable Content", detail, extra={"errors": errors})


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The log gets the exception's type and stack frames, not its message: a database error's message
    # can quote row values (patient names). The client gets no internals.
    route = getattr(request.scope.get("route"), "path", None)
    frames = "".join(traceback.format_tb(exc.__traceback__))[-4000:]
    log.error("unhandled error", extra={"route": route, "error": type(exc).__name__, "frames": frames})
    return problem_response(request, 500, "internal-error", "Internal Server Error", "see the server log")


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(Exception, _on_unexpected)


_DESCRIPTIONS = {
    400: "Bad request",
    401: "No valid API key",
    403: "The key's role may not do this",
    404: "Unknown study, report version, conversation or turn",
    409: "The study is not in a state that allows this (e.g. not yet reported)",
    413: "The question is too long",
    422: "Invalid input, or the conversation would exceed the model's context",
    503: "A dependency (database, broker, worker) is not available; see Retry-After",
    504: "The answer did not arrive in time; poll the turn",
}


def problem_responses(*codes: int) -> Responses:
    """OpenAPI ``responses`` entries for the given error codes, all as problem details."""
    return {
        code: {
            "description": _DESCRIPTIONS.get(code, HTTPStatus(code).phrase),
            "model": ProblemDetail,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemDetail"}}},
        }
        for code in codes
    }
