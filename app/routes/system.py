"""GET /health (always public) and GET /metrics (on the main port unless TVS_METRICS_PORT moves it)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from app.deps import READ_PROBLEMS, KeyAccess, MetricsDep, SettingsDep
from app.schemas import HealthResponse
from app.services import Services
from app.system_status import health, render_metrics

logger = logging.getLogger(__name__)

router = APIRouter(tags=["system"])
# Included by create_app only when /metrics is not on a port of its own; needs a key, like the jobs.
metrics_router = APIRouter(tags=["system"], dependencies=[KeyAccess], responses=READ_PROBLEMS)


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={
        503: {
            "model": HealthResponse,
            "description": "not ready: the model or index is not loaded, the database is unreachable, or "
            "the index is more than TVS_MAX_FEED_LAG_S behind the change feed (`feed` says how far)",
        }
    },
)
def get_health(request: Request, response: Response, settings: SettingsDep) -> HealthResponse:
    # Reads app.state directly rather than through ServicesDep, which answers 503 without a body.
    services: Services | None = getattr(request.app.state, "services", None)
    body = health(services, settings)
    if not body.ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return body


@metrics_router.get(
    "/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}}
)
async def get_metrics(request: Request, metrics: MetricsDep) -> Response:
    services: Services | None = getattr(request.app.state, "services", None)
    body = await run_in_threadpool(render_metrics, services, metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
