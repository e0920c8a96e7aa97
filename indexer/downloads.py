"""A URL job's first stage: download the file, check it is a video, and register it under the same job."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog, jobs
from indexer.catalog import Job
from indexer.db import session_scope
from indexer.failures import failure_reason, skip_reason
from indexer.ingest import IngestError, JobGoneError, ingest_file
from indexer.paths import DataDir
from indexer.pipeline import VideoTask
from indexer.receive import ReceivedFile, UploadTooLargeError
from indexer.url_fetch import DownloadCancelledError, UrlFetcher, UrlFetchError, UrlRefusedError
from model.video import VideoDecodeError, probe


class Worker(Protocol):
    """What a download needs from the worker running it (indexer.worker.Worker has it)."""

    fetcher: UrlFetcher
    data: DataDir
    factory: sessionmaker[Session]
    max_download_bytes: int
    worker_id: str
    model_id: str

    def download_progress(self, job_id: int, done: int, total: int | None) -> None: ...

    def stopping(self) -> bool: ...

    def job_cancelled(self, job_id: int) -> bool: ...


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Download:
    job_id: int
    url: str
    title: str | None
    meta: dict[str, Any] | None


def download_job(worker: Worker, job: Download) -> VideoTask | None:
    """Run the download stage of a claimed URL job; the video's pipeline task, or None once the job is
    settled here (failed, cancelled, or a duplicate of a video already in the library)."""
    try:
        received = worker.fetcher.download(
            job.url,
            worker.data.incoming,
            worker.max_download_bytes,
            on_bytes=lambda done, total: worker.download_progress(job.job_id, done, total),
            cancelled=lambda: worker.stopping() or worker.job_cancelled(job.job_id),
        )
    except DownloadCancelledError:
        if worker.stopping():  # shutting down: the next worker downloads it again from the start
            with session_scope(worker.factory) as session:
                jobs.release(session, job.job_id, worker_id=worker.worker_id)
        return None
    except UrlFetchError as e:
        return _fail(worker, job, str(e), retryable=e.retryable)
    except (UrlRefusedError, UploadTooLargeError) as e:
        return _fail(worker, job, str(e), retryable=False)
    except OSError as e:
        return _fail(worker, job, failure_reason(e), retryable=True)
    try:
        return _register(worker, job, received)
    finally:
        received.discard()  # moved into videos/ on success; never left in incoming/


def _register(worker: Worker, job: Download, received: ReceivedFile) -> VideoTask | None:
    try:
        probe(received.path)
    except VideoDecodeError as e:
        return _fail(worker, job, f"the download is {skip_reason(e)}", retryable=False)
    title = job.title or (Path(received.filename).stem if received.filename else None)
    try:
        result = ingest_file(
            worker.factory, worker.data, received.path, model_id=worker.model_id, title=title, source=job.url,
            meta=job.meta, mode="move", retry_failed=True, job=(job.job_id, worker.worker_id),
        )  # fmt: skip
    except JobGoneError:
        return None
    except (IngestError, OSError) as e:
        return _fail(worker, job, failure_reason(e), retryable=True)
    with session_scope(worker.factory) as session:
        if result.duplicate_of is not None:
            # The same bytes are in the library already: this job is done, pointing at that video.
            row = session.get(Job, job.job_id)
            if row is not None and row.lease_owner == worker.worker_id:
                row.video_id = result.duplicate_of
                jobs.complete(session, job.job_id, worker_id=worker.worker_id)
            logger.info("job %s: %s is a duplicate of video %s", job.job_id, job.url, result.duplicate_of)
            return None
        video = catalog.get_video(session, result.video_id)
        if video is None or not video.stored_path:
            return None
        video.status = "indexing"
        return VideoTask(video.id, worker.data.resolve(video.stored_path), job.job_id)


def _fail(worker: Worker, job: Download, reason: str, *, retryable: bool) -> VideoTask | None:
    with session_scope(worker.factory) as session:
        jobs.fail(session, job.job_id, reason, retryable, worker_id=worker.worker_id)
    return None
