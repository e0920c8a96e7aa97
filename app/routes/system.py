"""GET /health and GET /metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from app.deps import MetricsDep, SettingsDep
from app.schemas import HealthResponse
from app.services import Services
from app.system_status import health, index_size, jobs_by_state

logger = logging.getLogger(__name__)

router = APIRouter(tags=["system"])


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={
        503: {
            "model": HealthResponse,
            "description": "not ready: the model or index is not loaded, or the database is unreachable",
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


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def get_metrics(request: Request, metrics: MetricsDep) -> Response:
    services: Services | None = getattr(request.app.state, "services", None)
    size = await run_in_threadpool(index_size, services)
    info = (services.index.device, services.index.factory) if services is not None else None
    jobs = await run_in_threadpool(jobs_by_state, services)
    return Response(metrics.render(size, jobs, info), media_type=CONTENT_TYPE_LATEST)
