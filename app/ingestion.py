"""Write-side service functions: take a received file, a server path or a URL into the catalog as a job."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.errors import AppError, UserError
from app.schemas import MAX_TITLE_CHARS, IngestSourceIn
from app.uploads import BadUploadError, ReceivedFile, UploadTooLargeError, parse_meta, receive_multipart
from indexer import jobs
from indexer.db import session_scope
from indexer.ingest import IngestResult, SegmentDeleter, ingest_file
from indexer.ingest import delete_video as indexer_delete_video
from indexer.paths import DataDir
from indexer.url_fetch import UrlFetcher

logger = logging.getLogger(__name__)

MAX_JSON_BYTES = 64 * 1024
MULTIPART_OVERHEAD = 256 * 1024  # boundaries, part headers and the small text fields


class PathRefusedError(AppError, UserError):
    """A server path outside every allowed root (after resolving `..` and symlinks), or path ingestion is off."""

    code = "path_refused"


class SourceNotFoundError(AppError, UserError):
    """A server path inside an allowed root that is not an existing regular file."""

    code = "source_not_found"


class BadSourceError(AppError, UserError, ValueError):
    """A server path that cannot be a file name at all (relative, NUL bytes)."""

    code = "bad_source"


@dataclass(frozen=True)
class QueuedDownload:
    """A URL accepted for download: the job makes the video once it has the bytes."""

    job_id: int


@dataclass(frozen=True)
class Ingestor:
    """What ingestion needs from the running service."""

    session_factory: sessionmaker[Session]
    data: DataDir
    model_id: str
    allowed_roots: tuple[Path, ...]
    sink: SegmentDeleter | None = None  # the vector database, when TVS_VECTOR_BACKEND=milvus

    def from_received(
        self, received: ReceivedFile, *, title: str | None, meta: dict[str, Any] | None, source: str
    ) -> IngestResult:
        """Queue an upload or download already written under data/incoming (moved into videos/)."""
        fallback = Path(received.filename).stem if received.filename else None
        try:
            return ingest_file(
                self.session_factory,
                self.data,
                received.path,
                model_id=self.model_id,
                title=title or fallback,
                source=source,
                meta=meta,
                mode="move",
            )
        finally:
            received.discard()  # moved away on success; on any failure it must not linger in incoming/

    def from_path(self, raw: str, *, title: str | None, meta: dict[str, Any] | None) -> IngestResult:
        """Queue a library file where it lies; it must resolve inside one of TVS_ALLOWED_ROOTS."""
        path = resolve_allowed_path(raw, self.allowed_roots)
        return ingest_file(
            self.session_factory,
            self.data,
            path,
            model_id=self.model_id,
            title=title,
            source=str(path),
            meta=meta,
            mode="in_place",
        )

    def from_url(self, url: str, *, title: str | None, meta: dict[str, Any] | None) -> QueuedDownload:
        """Queue a job that downloads the URL, then indexes it (the worker does both)."""
        with session_scope(self.session_factory) as session:
            job = jobs.enqueue(session, "ingest", None, self.model_id, url=url, title=title, meta=meta)
            return QueuedDownload(job.id)

    def delete(self, video_id: int) -> list[int] | None:
        return indexer_delete_video(self.session_factory, self.data, video_id, sink=self.sink)


def resolve_allowed_path(raw: str, roots: tuple[Path, ...]) -> Path:
    """The real path of `raw` (symlinks and `..` resolved) if it lies inside an allowed root."""
    if not roots:
        raise PathRefusedError(
            "this server does not take server-side paths (TVS_ALLOWED_ROOTS is empty); upload the file instead"
        )
    if "\x00" in raw:
        raise BadSourceError("the path contains a NUL byte")
    try:
        path = Path(raw).expanduser()
        if not path.is_absolute():
            raise BadSourceError(f"give an absolute path inside one of the allowed roots, not {raw!r}")
        real = path.resolve(strict=False)
    except UnicodeError as e:
        raise BadSourceError("the path is not valid text for a file name") from e
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop, or ~user without a home
        raise PathRefusedError(f"the path cannot be resolved: {e}") from e
    if not any(real.is_relative_to(root) for root in roots):
        # Said the same way whether or not the file exists, so the answer reveals nothing outside.
        raise PathRefusedError("the path is outside the folders this server may read (TVS_ALLOWED_ROOTS)")
    try:
        is_file = real.is_file()
    except (OSError, UnicodeError):
        is_file = False
    if not is_file:
        raise SourceNotFoundError(f"{raw} is not an existing file")
    return real


class UnsupportedBodyError(AppError, UserError, ValueError):
    """POST /videos got a body that is neither multipart/form-data nor JSON."""

    code = "unsupported_media_type"


async def ingest_request(
    request: Request, ingestor: Ingestor, fetcher: UrlFetcher, *, max_upload_bytes: int
) -> IngestResult | QueuedDownload:
    """POST /videos: a multipart upload, or JSON naming a server path or a URL (checked, then downloaded by
    the worker inside its job); bodies are streamed, never held whole."""
    content_type = request.headers.get("content-type", "")
    incoming = ingestor.data.incoming
    if content_type.startswith("multipart/form-data"):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_upload_bytes + MULTIPART_OVERHEAD:
            raise UploadTooLargeError(max_upload_bytes)  # refuse before reading a byte
        received = await receive_multipart(request.stream(), content_type, incoming, max_upload_bytes)
        try:
            title = received.fields.get("title") or None
            if title is not None and len(title) > MAX_TITLE_CHARS:
                raise BadUploadError(f"`title` is longer than {MAX_TITLE_CHARS} characters")
            meta = parse_meta(received.fields.get("meta"))
        except BaseException:
            await run_in_threadpool(received.discard)
            raise
        source = f"upload:{received.filename or 'unnamed'}"
        return await run_in_threadpool(
            ingestor.from_received, received, title=title, meta=meta, source=source
        )
    if content_type.split(";")[0].strip() != "application/json":
        raise UnsupportedBodyError(
            'send the video as multipart/form-data (a `file` field), or JSON {"path": ...} or {"url": ...}'
        )
    body = await read_limited(request, MAX_JSON_BYTES)
    spec = IngestSourceIn.model_validate_json(body)
    if spec.path is not None:
        return await run_in_threadpool(ingestor.from_path, spec.path, title=spec.title, meta=spec.meta)
    url = str(spec.url)
    await fetcher.check(url)  # a refused scheme or address is a 403 now, not a failed job later
    return await run_in_threadpool(ingestor.from_url, url, title=spec.title, meta=spec.meta)


async def read_limited(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadUploadError(f"the JSON body is longer than {limit} bytes")
    return bytes(body)
