"""Videos: ingestion (upload, server path, URL), listing, details, deletion, media with Range, thumbnails."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import BaseModel, ValidationError

from app import library
from app.deps import (
    READ_PROBLEMS,
    WRITE_PROBLEMS,
    DataDep,
    FetcherDep,
    IngestorDep,
    MetricsDep,
    ReadAccess,
    SessionDep,
    SettingsDep,
    WriteAccess,
)
from app.errors import ApiError, UserError, user_error
from app.ingestion import (
    QueuedDownload,
    ingest_request,
)
from app.schemas import IngestResponse, IngestSourceIn, Problem, VideoDetail, VideosPublic

logger = logging.getLogger(__name__)

router = APIRouter(tags=["library"])

MAX_ID = 2**63 - 1
IdParam = Annotated[int, Path(ge=1, le=MAX_ID)]


_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "the video file"},
        "title": {"type": "string", "maxLength": 500},
        "meta": {"type": "string", "description": "a JSON object of your own metadata"},
    },
    "additionalProperties": False,  # any other field is refused with 422, and the schema says so
}
_INGEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            "application/json": {"schema": IngestSourceIn.model_json_schema()},
        },
    }
}


class DeleteResponse(BaseModel):
    video_id: int
    segments_removed: int


def _problem(code: int, description: str) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Problem, "description": description}}


@router.post(
    "/videos",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=IngestResponse,
    dependencies=[WriteAccess],
    openapi_extra=_INGEST_BODY,
    summary="Add a video: multipart upload, or JSON {path} (under an allowed root) or {url}",
    description=(
        "202 with the job that indexes the video. A `url` is checked at once (scheme, public address) and "
        "downloaded by the job: `video_id` is null until the download is done; follow the `Location` "
        "header (`/jobs/{id}`) for its bytes, stages and any failure."
    ),
    responses={
        200: {"model": IngestResponse, "description": "an identical file is already in the library"},
        **WRITE_PROBLEMS,
        **_problem(403, "the key is read-only, or the path or URL is not allowed"),
        **_problem(404, "the path does not exist"),
        **_problem(413, "larger than TVS_MAX_UPLOAD_BYTES"),
        **_problem(415, "neither multipart/form-data nor JSON"),
        422: {
            "description": "an invalid body: a list of validation errors, or a message in `detail`; `code` says which"
        },
        **_problem(502, "the URL's host cannot be resolved"),
    },
)
async def add_video(
    request: Request,
    response: Response,
    ingestor: IngestorDep,
    fetcher: FetcherDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> IngestResponse:
    kind = "multipart" if request.headers.get("content-type", "").startswith("multipart/") else "json"
    try:
        result = await ingest_request(request, ingestor, fetcher, max_upload_bytes=settings.max_upload_bytes)
    except ValidationError as e:
        metrics.uploads.labels(source=kind, outcome="invalid").inc()
        raise RequestValidationError(e.errors(include_url=False), body=None) from e
    except UserError as e:  # every layer's: each carries its code (and so its status) and its message
        error = user_error(e)
        metrics.uploads.labels(source=kind, outcome=str(error.status_code)).inc()
        raise error from e
    if isinstance(result, QueuedDownload):
        metrics.uploads.labels(source=kind, outcome="accepted").inc()
        logger.info(
            "url download queued (job %s)", result.job_id, extra={"job_id": result.job_id, "source": kind}
        )
        response.headers["Location"] = f"/jobs/{result.job_id}"
        return IngestResponse(video_id=None, job_id=result.job_id, status="queued", duplicate_of=None)
    metrics.uploads.labels(source=kind, outcome="duplicate" if result.duplicate_of else "accepted").inc()
    logger.info(
        "video %s %s (job %s, %s)",
        result.video_id,
        f"is a duplicate of {result.duplicate_of}" if result.duplicate_of is not None else "accepted",
        result.job_id,
        kind,
        extra={"video_id": result.video_id, "job_id": result.job_id, "source": kind},
    )
    if result.job_id is not None:
        response.headers["Location"] = f"/jobs/{result.job_id}"
    if result.duplicate_of is not None:
        response.status_code = status.HTTP_200_OK
    return IngestResponse(
        video_id=result.video_id, job_id=result.job_id, status=result.status, duplicate_of=result.duplicate_of
    )


@router.get("/videos", response_model=VideosPublic, dependencies=[ReadAccess], responses=READ_PROBLEMS)
def list_videos(
    session: SessionDep,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 24,
    status: Literal["pending", "indexing", "ready", "failed"] | None = None,
) -> VideosPublic:
    return library.list_videos(session, offset=offset, limit=limit, status=status)


@router.get(
    "/videos/{video_id}",
    response_model=VideoDetail,
    dependencies=[ReadAccess],
    responses={**READ_PROBLEMS, **_problem(404, "no such video")},
)
def get_video(video_id: IdParam, session: SessionDep) -> VideoDetail:
    video = library.get_video_detail(session, video_id=video_id)
    if video is None:
        raise ApiError("video_not_found", f"no video {video_id}")
    return video


@router.delete(
    "/videos/{video_id}",
    response_model=DeleteResponse,
    dependencies=[WriteAccess],
    responses={**WRITE_PROBLEMS, **_problem(404, "no such video")},
)
def delete_video(video_id: IdParam, ingestor: IngestorDep) -> DeleteResponse:
    freed = ingestor.delete(video_id)
    if freed is None:
        raise ApiError("video_not_found", f"no video {video_id}")
    return DeleteResponse(video_id=video_id, segments_removed=len(freed))


@router.get(
    "/videos/{video_id}/media",
    response_class=FileResponse,
    dependencies=[ReadAccess],
    responses={
        **READ_PROBLEMS,
        # The type comes from the probed container; a file whose container is not known is served as bytes.
        200: {"content": {"video/*": {}, "application/octet-stream": {}}},
        206: {
            "description": "partial content (Range)",
            "content": {"video/*": {}, "application/octet-stream": {}},
        },
        **_problem(404, "no such video or file"),
        416: {"description": "range not satisfiable"},
    },
)
def video_media(video_id: IdParam, session: SessionDep, data: DataDep) -> FileResponse:
    found = library.media_file(session, data, video_id=video_id)
    if found is None:
        raise ApiError("media_not_found", f"no media for video {video_id}")
    path, media_type = found
    # Starlette's FileResponse answers Range requests (206) itself, so a <video> element can seek.
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})


@router.get(
    "/segments/{segment_id}/thumbnail",
    response_class=FileResponse,
    dependencies=[ReadAccess],
    responses={
        200: {"content": {"image/jpeg": {}}},
        **READ_PROBLEMS,
        **_problem(404, "no such segment or thumbnail"),
    },
)
def segment_thumbnail(
    segment_id: IdParam, session: SessionDep, data: DataDep, settings: SettingsDep
) -> FileResponse:
    path = library.thumbnail_file(session, data, segment_id=segment_id)
    if path is None:
        raise ApiError("thumbnail_not_found", f"no thumbnail for segment {segment_id}")
    # A segment id is never reused, so its thumbnail never changes; a private library's stays out of
    # shared caches.
    scope = "public" if settings.reads_are_public else "private"
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": f"{scope}, max-age=86400"})
