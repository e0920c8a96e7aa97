"""The app factory: `create_app(settings)`; `uvicorn app.main:app` serves an app built on first access.

Importing this module builds nothing and reads no settings: `app` is created when something asks for it
(uvicorn does, once, at start-up), so tests and tools can import `create_app` without an environment.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from sqlalchemy import exc as sa_exc
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.access import API_KEY_HEADER
from app.allow_header import method_not_allowed
from app.errors import error_body, http_error
from app.metrics import Metrics, RequestMetricsMiddleware
from app.metrics_server import MetricsServer
from app.request_log import RequestLogMiddleware
from app.routes import demo, docs, jobs, search, session, system, videos
from app.security import BodyLimitMiddleware, SecurityHeadersMiddleware
from app.services import open_services
from app.settings import Settings
from app.system_status import render_metrics
from app.version import package_version
from indexer.log_setup import configure_logging

logger = logging.getLogger(__name__)

VERSION = package_version()
DATABASE_RETRY_AFTER_S = 5
# The catalog cannot be reached (server down, network, pool exhausted, SQLite locked or failing I/O): the
# request may succeed later, so 503 + Retry-After. Integrity and programming errors stay 500s: they are bugs.
DATABASE_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # Loading the model and the index blocks for seconds: keep it off the event loop.
    services = await run_in_threadpool(open_services, settings, app.state.metrics)
    await services.searcher.start()
    app.state.services = services
    metrics_server = None
    try:
        if settings.metrics_port is not None:
            metrics_server = MetricsServer(
                lambda: render_metrics(app.state.services, app.state.metrics),
                settings.metrics_host,
                settings.metrics_port,
            )
            await run_in_threadpool(metrics_server.start)
        yield
    finally:
        if metrics_server is not None:
            await run_in_threadpool(metrics_server.stop)
        app.state.services = None
        await services.searcher.stop()
        await run_in_threadpool(services.close)


def _readable(error: dict[str, Any]) -> str:
    loc = list(error.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]  # where the value came from; the field name is what a person needs
    where = ".".join(str(part) for part in loc)
    message = str(error.get("msg", "is not valid")).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _json_safe(value: Any) -> Any:
    """The echoed input of a validation error as strict JSON: inf/nan, lone surrogates and bytes that are not
    UTF-8 would fail to encode."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, bytes):  # the raw body of a JSON document pydantic could not parse (e.g. not UTF-8)
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 shape (`detail` list) plus `message`, the same errors in one sentence, and `code`."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    message = _json_safe("; ".join(_readable(e) for e in errors))
    body = error_body("validation_error", _json_safe(jsonable_encoder(_json_safe(errors))), message=message)
    return JSONResponse(body, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # The driver's first line names the failure (refused, timed out, locked); never the URL or credentials.
    cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    logger.warning(
        "%s %s: catalog database unavailable (%s: %s)",
        request.method,
        request.url.path,
        type(exc).__name__,
        cause[0] if cause else "",
    )
    return JSONResponse(
        error_body(
            "database_unavailable",
            "the catalog database is unreachable right now; try again in a few seconds",
        ),
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


def operation_id(route: APIRoute) -> str:
    """OpenAPI operation ids are the route functions' names (`search`, `list_videos`, `get_job`)."""
    return route.name


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; cheap: nothing heavy happens until the lifespan starts."""
    settings = settings or Settings()
    # uvicorn has set up its own loggers before it imports the app: this routes them and ours through one
    # handler, so that even its "Started server process" line has the configured format.
    configure_logging(settings.log_level, settings.log_format)
    app = FastAPI(
        title="TokenBinder video search",
        version=VERSION,
        summary="Type a sentence, get the matching moments of your videos",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        # Served by app/routes/docs.py instead, behind the same access as the library's reads.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.services = None
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(status.HTTP_405_METHOD_NOT_ALLOWED, method_not_allowed)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for error in DATABASE_UNAVAILABLE:
        app.add_exception_handler(error, _database_unavailable)
    for module in (search, videos, jobs, system, session, docs, demo):
        app.include_router(module.router)
    if settings.metrics_port is None:
        app.include_router(system.metrics_router)
    app.mount("/static", StaticFiles(directory=demo.STATIC_DIR), name="static")
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Content-Type", "Authorization", API_KEY_HEADER],
        )
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(RequestMetricsMiddleware, metrics=lambda: app.state.metrics)
    app.add_middleware(RequestLogMiddleware)  # outermost: its request id covers every other layer's lines
    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    # PEP 562: `app.main.app` (what `uvicorn app.main:app` reads) is built on first access, then kept.
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
