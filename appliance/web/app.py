"""The dashboard and API as one FastAPI application: :func:`create_app`.

Routes (roles: viewer < technician < admin; see :mod:`appliance.web.security`):

- health, no login: ``GET /healthz`` (the process answers), ``GET /readyz`` (DICOM listener up, models loaded when
  the pipeline is on, database writable; 503 with the reasons otherwise), ``GET /metrics`` (Prometheus text; no
  identifiers in it, see :mod:`appliance.web.metrics`);
- JSON API under ``/api/v1`` (:mod:`appliance.web.api`), schema at ``/api/v1/openapi.json``;
- HTML pages (:mod:`appliance.web.pages`) and ``/static`` (CSS, served from the package; nothing from the
  internet).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance import __version__
from appliance.core.config import Settings
from appliance.core.store import Store
from appliance.web.metrics import ApplianceMetrics
from appliance.web.ports import WebPorts
from appliance.web.security import FailureLimiter, LoginRequired, WebAuth, security_headers

PACKAGE_DIR = Path(str(resources.files("appliance.web")))
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class WebContext:
    """Everything the routes use (``request.app.state.web``)."""

    settings: Settings
    store: Store
    ports: WebPorts
    metrics: ApplianceMetrics
    templates: Jinja2Templates


def readiness(ctx: WebContext) -> list[str]:
    """Reasons the box is not ready to take studies; empty when ready."""
    reasons: list[str] = []
    try:
        if not ctx.ports.listener_up():
            reasons.append("DICOM listener is not accepting associations")
    except Exception as exc:
        reasons.append(f"DICOM listener status unknown: {exc}")
    if ctx.ports.pipeline_enabled:
        try:
            if not ctx.ports.engines().get("bundles_active"):
                reasons.append("no model loaded (every study would end no_model)")
        except Exception as exc:
            reasons.append(f"models status unknown: {exc}")
    try:
        with ctx.store.transaction() as conn:  # BEGIN IMMEDIATE takes the write lock: the database takes writes
            conn.execute("PRAGMA user_version")
        fd, name = tempfile.mkstemp(prefix=".readyz-", dir=ctx.settings.state_dir)
        os.close(fd)
        os.unlink(name)
    except Exception as exc:
        reasons.append(f"database or state directory not writable: {exc}")
    return reasons


def wants_html(request: Request) -> bool:
    """A browser navigating (``Sec-Fetch-Dest: document``, or ``text/html`` in ``Accept``) gets HTML error pages;
    the API, scripts and tools get JSON (``{"detail": ...}``)."""
    return request.headers.get("sec-fetch-dest") == "document" or "text/html" in request.headers.get("accept", "")


def create_app(settings: Settings, store: Store, ports: WebPorts, metrics: ApplianceMetrics) -> FastAPI:
    """The web application over ``store``; ``ports`` are the daemon's callables, ``metrics`` its registry."""
    from appliance.web import api, pages

    app = FastAPI(
        title="Clinic appliance API",
        version=__version__,
        openapi_url="/api/v1/openapi.json",
        docs_url=None,  # Swagger UI would load its scripts from a CDN: the clinic may have no internet
        redoc_url=None,
        max_body_size=settings.api.max_body_bytes,  # 413 beyond it, announced or streamed (Starlette's limiter)
    )
    templates = Jinja2Templates(directory=str(PACKAGE_DIR / "templates"))
    ctx = WebContext(settings, store, ports, metrics, templates)
    app.state.web = ctx
    app.state.auth = WebAuth(settings, store, FailureLimiter(settings.api.ip_max_failures, settings.api.ip_window_s))
    metrics.bind(settings, store, ports.cloud, ports.engines)

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        for name, value in security_headers():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(LoginRequired)
    async def _to_login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={exc.next_path}", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith("/api/") or not wants_html(request):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return pages.error_page(request, exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse({"detail": "invalid request: " + "; ".join(problems), "errors": problems}, 422)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        reasons = readiness(ctx)
        return JSONResponse({"ready": not reasons, "reasons": reasons}, status_code=503 if reasons else 200)

    @app.get("/metrics", include_in_schema=False)
    def metrics_route() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_METRICS)

    app.mount("/static", StaticFiles(directory=str(PACKAGE_DIR / "static")), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)
    return app
