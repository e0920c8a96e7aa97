"""Dependencies the routes declare (Annotated): settings, services, a catalog session, the searcher, access."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyCookie, APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.access import API_KEY_HEADER, SESSION_COOKIE, Access, Keys, session_is_valid
from app.errors import ApiError
from app.ingestion import Ingestor
from app.metrics import Metrics
from app.schemas import Problem
from app.searcher import Searcher
from app.services import Services
from app.settings import Settings
from indexer.paths import DataDir
from indexer.url_fetch import UrlFetcher

logger = logging.getLogger(__name__)

# Declared as security schemes, so OpenAPI lists them and /docs has an Authorize button; the checks are below.
api_key_header = APIKeyHeader(
    name=API_KEY_HEADER, scheme_name="APIKey", auto_error=False, description="TVS_API_KEY or TVS_READ_API_KEY"
)
bearer_key = HTTPBearer(
    scheme_name="Bearer", auto_error=False, description="the same key as `Authorization: Bearer KEY`"
)
session_cookie = APIKeyCookie(
    name=SESSION_COOKIE,
    scheme_name="Session",
    auto_error=False,
    description="set by POST /session; lets a browser's <video> and <img> tags read (never write)",
)


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


def _presented_key(
    header_key: Annotated[str | None, Security(api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_key)],
) -> str | None:
    """The key in X-API-Key, else in Authorization: Bearer."""
    if header_key:
        return header_key
    return (bearer.credentials.strip() or None) if bearer is not None else None


PresentedKey = Annotated[str | None, Depends(_presented_key)]


def get_keys(settings: SettingsDep) -> Keys:
    write = settings.api_key.get_secret_value() if settings.api_key else None
    read = settings.read_api_key.get_secret_value() if settings.read_api_key else None
    return Keys(write, read)


def unauthorized(presented: str | None) -> ApiError:
    # Every wrong key gets the same answer: nothing in it tells how close a guess was.
    if presented is None:
        return ApiError(
            "api_key_missing",
            f"this endpoint needs the API key: send it in the {API_KEY_HEADER} header (or Authorization: Bearer)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return ApiError("api_key_invalid", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})


def _read_access(settings: Settings, presented: str | None, session: str | None, *, public: bool) -> Access:
    keys = get_keys(settings)
    if keys.write is None or public:
        return Access.WRITE if keys.write is None else Access.READ
    level = keys.access_for(presented)
    if level is Access.NONE and presented is None:
        if session_is_valid(keys.session_secret(), session, time.time()):
            return Access.READ
    if level is Access.NONE:
        raise unauthorized(presented)
    return level


def require_read(
    settings: SettingsDep,
    presented: PresentedKey,
    session: Annotated[str | None, Security(session_cookie)],
) -> Access:
    """Library reads (search, list, media, thumbnails, /docs): any key or a session, or none with
    TVS_PUBLIC_READ."""
    return _read_access(settings, presented, session, public=settings.public_read)


def require_key(
    settings: SettingsDep,
    presented: PresentedKey,
    session: Annotated[str | None, Security(session_cookie)],
) -> Access:
    """Jobs and /metrics: any key or a session, even with TVS_PUBLIC_READ."""
    return _read_access(settings, presented, session, public=False)


def require_write(settings: SettingsDep, presented: PresentedKey) -> Access:
    """Adding and deleting videos: the write key itself, as a header (a session cookie never writes)."""
    level = get_keys(settings).access_for(presented)
    if level is Access.NONE:
        raise unauthorized(presented)
    if level is Access.READ:
        raise ApiError(
            "api_key_read_only",
            "this key is read-only (TVS_READ_API_KEY): it may search, list and watch; adding or deleting "
            "videos needs the write key (TVS_API_KEY)",
        )
    return level


ReadAccess = Depends(require_read)
KeyAccess = Depends(require_key)
WriteAccess = Depends(require_write)
KeysDep = Annotated[Keys, Depends(get_keys)]

_DENIED: dict[str, Any] = {
    "model": Problem,
    "description": "a key is configured and none or a wrong one was sent",
}
READ_PROBLEMS: dict[int | str, dict[str, Any]] = {401: _DENIED}
WRITE_PROBLEMS: dict[int | str, dict[str, Any]] = {
    401: _DENIED,
    403: {"model": Problem, "description": "the read-only key cannot add or delete videos"},
}
