"""Liveness, readiness and metrics (no authentication: they carry no patient data)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from api.deps import AppRegistry, AppServices
from api.problems import PROBLEM_MEDIA_TYPE, TYPE_BASE, problem_responses
from api.schemas import Health
from radialog.presence import BrokerUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses=problem_responses(503))
def readyz(request: Request, registry: AppRegistry, services: AppServices) -> Response:
    """Readiness: the registry answers, the broker answers, and at least one worker has its model loaded."""
    checks: dict[str, str] = {}
    workers: list[dict] = []
    try:
        registry.ping()
        checks["registry"] = "ok"
    except SQLAlchemyError as exc:
        checks["registry"] = f"unavailable: {type(exc).__name__}"
    try:
        services.presence.ping()
        checks["broker"] = "ok"
        workers = services.ready_workers()
        checks["workers"] = f"{len(workers)} ready" if workers else "none ready"
    except BrokerUnavailable as exc:
        checks["broker"] = f"unavailable: {exc}"
        checks["workers"] = "unknown"
    if checks["registry"] == "ok" and checks["broker"] == "ok" and workers:
        return JSONResponse(Health(status="ok", checks=checks, workers=workers).model_dump(mode="json"))
    return JSONResponse(
        {
            "type": TYPE_BASE + "not-ready",
            "title": "Service Unavailable",
            "status": 503,
            "detail": "; ".join(f"{k}: {v}" for k, v in checks.items()),
            "instance": request.url.path,
            "checks": checks,
        },
        status_code=503,
        media_type=PROBLEM_MEDIA_TYPE,
        headers={"Retry-After": "10"},
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text format", "content": {CONTENT_TYPE_LATEST: {}}}},
)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.collectors), media_type=CONTENT_TYPE_LATEST)
