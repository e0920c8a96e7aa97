"""Service functions behind /health and /metrics."""

from __future__ import annotations

import logging

from app.schemas import HealthIndex, HealthModel, HealthResponse
from app.services import Services
from app.settings import Settings
from indexer import catalog

logger = logging.getLogger(__name__)


def health(services: Services | None, settings: Settings) -> HealthResponse:
    """Ready only once the model is loaded and the index is open (the lifespan finished)."""
    common = dict(
        worker=settings.worker,
        auth_required=settings.api_key is not None,
        max_upload_bytes=settings.max_upload_bytes,
    )
    if services is None:
        return HealthResponse(status="starting", ready=False, model=None, index=None, **common)
    cfg = services.model.config
    return HealthResponse(
        status="ok",
        ready=True,
        model=HealthModel(
            id=services.model.model_id,
            device=services.device,
            precision=services.precision,
            top_k=services.searcher.top_k,
            num_frames=cfg.num_frames,
            dim=cfg.embed_dim,
        ),
        index=HealthIndex(size=services.index.size, type=services.index.factory),
        **common,
    )


def jobs_by_state(services: Services | None) -> dict[str, int]:
    if services is None:
        return {}
    with services.session_factory() as session:
        return catalog.job_counts(session)
