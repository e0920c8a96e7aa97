"""Dependencies the routes declare (Annotated): settings, services, a catalog session, the searcher, auth."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.ingestion import Ingestor
from app.metrics import Metrics
from app.searcher import Searcher
from app.security import check_api_key, presented_key
from app.services import Services
from app.settings import Settings
from indexer.paths import DataDir
from indexer.url_fetch import UrlFetcher

logger = logging.getLogger(__name__)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


def get_services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        raise ApiError("service_starting", "the service is starting; try again shortly")
    return services


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    with services.session_factory() as session:
        yield session


def get_searcher(services: ServicesDep) -> Searcher:
    return services.searcher


def get_ingestor(services: ServicesDep) -> Ingestor:
    return services.ingestor


def get_fetcher(services: ServicesDep) -> UrlFetcher:
    return services.fetcher


def get_data(services: ServicesDep) -> DataDir:
    return services.data


SessionDep = Annotated[Session, Depends(get_session)]
SearcherDep = Annotated[Searcher, Depends(get_searcher)]
IngestorDep = Annotated[Ingestor, Depends(get_ingestor)]
FetcherDep = Annotated[UrlFetcher, Depends(get_fetcher)]
DataDep = Annotated[DataDir, Depends(get_data)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """Write endpoints: the configured key must be presented (X-API-Key or Authorization: Bearer)."""
    expected = settings.api_key.get_secret_value() if settings.api_key else None
    check_api_key(expected, presented_key(request))


WriteAccess = Depends(require_api_key)
