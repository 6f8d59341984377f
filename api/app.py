"""``create_app(settings, registry=None)``: the FastAPI application (API under /api/v1, the page at /).

One settings object and one registry per app, injected into the routes through ``api.deps``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from api.limits import BodyGate
from api.metrics import Metrics, MetricsMiddleware
from api.problems import install_handlers
from api.routes import audit, dialog, health, images, me, operations, quality, reports, studies
from api.services import Services
from radialog import __version__
from radialog.registry import Registry
from radialog.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"
OPENAPI_URL = "/api/v1/openapi.json"
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)

DESCRIPTION = """AI draft reports (RaDialog) for chest X-rays, their versions and a follow-up dialog.

Every report is **unverified AI output** until a radiologist approves it (`verified: true`).
Authenticate with an API key: `Authorization: Bearer <key>` or `X-API-Key: <key>`.
Errors are RFC 9457 problem details (`application/problem+json`)."""


def create_app(settings: Settings, registry: Registry | None = None) -> FastAPI:
    """The app; ``registry`` defaults to the one named by ``settings`` (migrated on start)."""
    owns_registry = registry is None
    registry = registry or Registry.from_settings(settings)
    services = Services(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        services.close()
        if owns_registry:
            registry.dispose()

    # No HTML docs page: Swagger UI / ReDoc would be third-party script running at the API's origin (where
    # keys are typed and patient data is read), loaded from a CDN or from a pip bundle that lags its
    # security releases. The OpenAPI document stays; any local viewer reads it.
    app = FastAPI(
        title="radialog-node reporting API",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=OPENAPI_URL,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.services = services
    app.state.metrics = Metrics(registry, settings, services)
    install_handlers(app)

    v1 = APIRouter(prefix="/api/v1")
    v1.include_router(studies.router)
    v1.include_router(reports.router)
    v1.include_router(images.router)
    v1.include_router(me.router)
    v1.include_router(dialog.router)
    v1.include_router(audit.router)
    v1.include_router(quality.router)
    v1.include_router(operations.router)
    app.include_router(v1)
    app.include_router(health.router)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> RedirectResponse:
        return RedirectResponse("/static/index.html")

    @app.get("/api/docs", include_in_schema=False)
    def docs() -> RedirectResponse:
        return RedirectResponse(OPENAPI_URL)

    # the key before the body, then its size (innermost: CORS, metrics and the headers below see its answers)
    app.add_middleware(BodyGate, registry=registry, max_body_bytes=settings.api_max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)

    @app.middleware("http")
    async def page_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # The page loads nothing from elsewhere and is never framed; images come as blob: URLs.
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if request.url.path.startswith("/api/"):  # patient data (reports, images, answers): never cached
            response.headers["Cache-Control"] = "no-store"
        if request.url.path.startswith("/static/"):
            response.headers["Content-Security-Policy"] = PAGE_CSP
        return response

    return app
