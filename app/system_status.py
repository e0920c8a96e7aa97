"""Service functions behind /health and /metrics."""

from __future__ import annotations

import logging
from typing import Any, Literal

from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from app.schemas import HealthIndex, HealthModel, HealthResponse
from app.services import Services
from app.settings import Settings
from indexer import catalog
from indexer.milvus_index import MilvusUnavailableError

logger = logging.getLogger(__name__)


def health(services: Services | None, settings: Settings) -> HealthResponse:
    """Ready only once the model is loaded and the index is open (the lifespan finished)."""
    common: dict[str, Any] = dict(
        worker=settings.worker,
        auth_required=settings.api_key is not None,
        max_upload_bytes=settings.max_upload_bytes,
    )
    if services is None:
        return HealthResponse(status="starting", ready=False, model=None, index=None, **common)
    reachable = database_reachable(services)
    cfg = services.model.config
    try:
        index: HealthIndex | None = index_health(services)
    except MilvusUnavailableError as e:
        logger.warning("health: %s", e)
        index = None
    status: Literal["ok", "database unreachable", "vector database unreachable"] = "ok"
    if not reachable:
        status = "database unreachable"
    elif index is None:
        status = "vector database unreachable"
    return HealthResponse(
        status=status,
        ready=reachable and index is not None,
        model=HealthModel(
            id=services.model.model_id,
            device=services.device,
            precision=services.precision,
            top_k=services.searcher.top_k,
            num_frames=cfg.num_frames,
            dim=cfg.embed_dim,
        ),
        index=index,
        **common,
    )


def index_health(services: Services) -> HealthIndex:
    index = services.index
    knobs = index.search_settings()
    return HealthIndex(
        size=index.size,
        type=index.factory,
        device=index.device,
        device_reason=(index.device_reason or None) if index.device == "cpu" else None,
        nprobe=knobs["nprobe"],
        ef_search=knobs["ef_search"],
        rerank=index.rerank,
    )


def index_size(services: Services | None) -> int:
    """Segments in the index for /metrics; 0 (logged) while the vector database cannot be reached."""
    if services is None:
        return 0
    try:
        return services.index.size
    except MilvusUnavailableError as e:
        logger.warning("metrics: index size unavailable: %s", e)
        return 0


def database_reachable(services: Services) -> bool:
    """One round trip to the catalog; False (logged) when the server is down or the network is cut."""
    try:
        with services.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as e:
        logger.warning("health: the catalog database is unreachable (%s)", type(e).__name__)
        return False
    return True


def jobs_by_state(services: Services | None) -> dict[str, int]:
    """Job counts for /metrics; empty when the catalog cannot be read (the scrape still gets the rest)."""
    if services is None:
        return {}
    try:
        with services.session_factory() as session:
            return catalog.job_counts(session)
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as e:
        logger.warning(
            "metrics: job counts unavailable, the catalog database is unreachable (%s)", type(e).__name__
        )
        return {}
