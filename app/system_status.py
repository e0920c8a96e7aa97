"""Service functions behind /health and /metrics."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from app.cutoff import DefaultCutoff
from app.metrics import Metrics
from app.schemas import HealthCutoff, HealthFeed, HealthIndex, HealthModel, HealthResponse, HealthStatus
from app.services import Services
from app.settings import Settings
from indexer import catalog
from indexer.live_index import LiveIndex
from indexer.milvus_schema import MilvusUnavailableError

logger = logging.getLogger(__name__)


def health(services: Services | None, settings: Settings) -> HealthResponse:
    """Ready once the model is loaded and the index is open (the lifespan finished), while the catalog is
    reachable and the index is no more than `max_feed_lag_s` behind its change feed."""
    common: dict[str, Any] = dict(
        worker=settings.worker,
        auth_required=settings.api_key is not None,
        public_read=settings.reads_are_public,
        max_upload_bytes=settings.max_upload_bytes,
    )
    if services is None:
        return HealthResponse(status="starting", ready=False, model=None, index=None, **common)
    reachable = database_reachable(services)
    # A Milvus-backed replica follows no change feed: it has no lag to report.
    feed = feed_health(services.index, settings) if isinstance(services.index, LiveIndex) else None
    cfg = services.model.config
    try:
        index: HealthIndex | None = index_health(services)
    except MilvusUnavailableError as e:
        logger.warning("health: %s", e)
        index = None
    status: HealthStatus = "ok"
    if not reachable:
        status = "database unreachable"
    elif index is None:
        status = "vector database unreachable"
    elif feed is not None and feed.lag_seconds > feed.max_lag_seconds:
        status = "catching up with the change feed"
    return HealthResponse(
        status=status,
        ready=status == "ok",
        model=HealthModel(
            id=services.model.model_id,
            device=services.device,
            precision=services.precision,
            top_k=services.searcher.top_k,
            num_frames=cfg.num_frames,
            dim=cfg.embed_dim,
            cutoff=cutoff_health(services.searcher.default_cutoff),
        ),
        index=index,
        feed=feed,
        **common,
    )


def feed_health(index: LiveIndex, settings: Settings) -> HealthFeed:
    lag = index.feed_lag
    return HealthFeed(
        position=lag.position,
        head=lag.head,
        lag_rows=lag.rows,
        lag_seconds=round(lag.seconds(), 3),
        max_lag_seconds=settings.max_feed_lag_s,
    )


def cutoff_health(default: DefaultCutoff) -> HealthCutoff:
    cal = default.calibration
    return HealthCutoff(
        min_score=default.min_score(rerank=True),
        broad_min_score=default.min_score(rerank=False),
        precision_target=cal.precision_target if cal else None,
        validation_queries=cal.queries if cal else None,
        calibrated_at=cal.created_at if cal else None,
        note=default.note,
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


def render_metrics(services: Services | None, metrics: Metrics) -> bytes:
    """The Prometheus text for /metrics, on either port (blocking: it counts the jobs in the catalog)."""
    size = index_size(services)
    info = (services.index.device, services.index.factory) if services is not None else None
    lag = services.index.feed_lag if services is not None and isinstance(services.index, LiveIndex) else None
    feed = (lag.seconds(), lag.rows) if lag is not None else (0.0, 0)
    return metrics.render(size, jobs_by_state(services), info, feed)


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
