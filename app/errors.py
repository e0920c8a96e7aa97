"""Error bodies: `{"detail": ..., "code": ...}` with a stable machine-readable code; the table of every code."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.errors import UserError

logger = logging.getLogger(__name__)

# code -> (HTTP status, when). docs/errors.md is this table; tests/app/test_errors.py keeps them equal.
ERROR_CODES: dict[str, tuple[int, str]] = {
    "validation_error": (
        422,
        "the request's body, query or path parameters are invalid (`detail` lists each)",
    ),
    "api_key_missing": (401, "the endpoint needs the API key and none was sent"),
    "api_key_invalid": (401, "the API key sent is not the configured one"),
    "api_key_read_only": (403, "the read-only key (TVS_READ_API_KEY) was sent to an endpoint that writes"),
    "path_refused": (403, "POST /videos {path}: the path is outside TVS_ALLOWED_ROOTS"),
    "url_refused": (403, "POST /videos {url}: the URL is not allowed (scheme, private address)"),
    "video_not_found": (404, "no video with this id"),
    "media_not_found": (404, "the video has no playable file"),
    "thumbnail_not_found": (404, "no segment with this id, or it has no thumbnail"),
    "job_not_found": (404, "no job with this id"),
    "bad_page_token": (
        400,
        "POST /search: a page_token that is not ours, belongs to another search, or is too deep",
    ),
    "job_state_conflict": (
        409,
        "retry of a job that is not failed or cancelled, or cancel of a finished one",
    ),
    "rebuild_in_progress": (
        409,
        "`indexer rebuild-index --backend milvus` while another rebuild of the model holds the lease (CLI: exit 2)",
    ),
    "source_not_found": (404, "POST /videos {path}: the file does not exist"),
    "not_found": (404, "no such route"),
    "method_not_allowed": (405, "the route does not take this method"),
    "body_too_large": (413, "a JSON body over 1 MiB"),
    "upload_too_large": (413, "an upload over TVS_MAX_UPLOAD_BYTES"),
    "unsupported_media_type": (415, "POST /videos: neither multipart/form-data nor JSON"),
    "bad_upload": (422, "the multipart upload is malformed or not a video"),
    "bad_source": (422, "POST /videos: the JSON body names no usable path or URL"),
    "not_a_video": (422, "the file cannot be ingested as a video"),
    "url_fetch_failed": (502, "POST /videos {url}: the URL could not be fetched"),
    "service_starting": (503, "the model and the index are still loading"),
    "service_stopping": (503, "the service is shutting down"),
    "vector_database_unavailable": (
        503,
        "TVS_VECTOR_BACKEND=milvus and Milvus cannot be reached; retry shortly",
    ),
    "database_unavailable": (503, "the catalog database cannot be reached; retry after Retry-After seconds"),
    "invalid_input": (422, "input or setup the service cannot use; `detail` says why and what to do"),
    "http_error": (400, "any other HTTP error (the status says which)"),
    "internal_error": (500, "a bug: the log line with the same request id (X-Request-ID) has the traceback"),
}
# A Starlette/FastAPI HTTPException raised without a code (unknown route, wrong method, other modules).
_BY_STATUS = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


class AppError(Exception):
    """Every error the app layer raises on purpose derives from this (user errors also from UserError)."""


def user_error(error: UserError) -> ApiError:
    """The HTTP answer to any layer's UserError: its own code (and so its status), its own message."""
    return ApiError(error.code, str(error))


class ApiError(HTTPException):
    """An HTTP error with its code from ERROR_CODES; routes raise it, the handler renders `detail` + `code`."""

    def __init__(self, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}: add it to app.errors.ERROR_CODES")
        super().__init__(ERROR_CODES[code][0], detail, headers)
        self.code = code


def error_body(code: str, detail: Any, **more: Any) -> dict[str, Any]:
    return {"detail": detail, "code": code, **more}


def code_of(exc: StarletteHTTPException) -> str:
    return getattr(exc, "code", None) or _BY_STATUS.get(exc.status_code, "http_error")


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(
        error_body(code_of(exc), exc.detail),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )
