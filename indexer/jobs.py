"""The job queue: enqueue, claim under a lease, heartbeat, progress, complete, and fail with back-off."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from indexer.catalog import JOB_KINDS, JOB_STATES, Job, Video, job_counts
from indexer.db import utcnow
from indexer.errors import IndexerError, UserError

logger = logging.getLogger(__name__)

# States of a claimed job; its lease must be renewed (heartbeat) or another worker takes it over.
ACTIVE_STATES = ("downloading", "decoding", "encoding")
OPEN_STATES = ("queued", *ACTIVE_STATES)
RETRYABLE_STATES = ("failed", "cancelled")
CANCELLED_REASON = "cancelled by a user (DELETE /jobs/{id})"
BACKOFF_BASE_S = 5.0
BACKOFF_CAP_S = 600.0


def backoff_delay(attempts: int, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S) -> timedelta:
    """Wait before the next try after `attempts` failed ones: base, 2*base, 4*base, ... up to cap."""
    return timedelta(seconds=min(cap_s, base_s * 2 ** max(0, attempts - 1)))


class JobStateError(IndexerError, UserError, ValueError):
    """The job is in a state that does not allow what was asked (retry a running job, cancel a finished one)."""

    code = "job_state_conflict"


def enqueue(
    session: Session,
    kind: str,
    video_id: int | None,
    model_id: str | None,
    max_attempts: int = 3,
    *,
    url: str | None = None,
    title: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Job:
    """Queue a job for a video, or (with `url` and no video) one that downloads the video first."""
    if kind not in JOB_KINDS:
        raise ValueError(f"job kind must be one of {JOB_KINDS}, got {kind!r}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if video_id is not None and url is not None:
        raise ValueError("a job names either a stored video or a URL to download, not both")
    job = Job(
        kind=kind, video_id=video_id, model_id=model_id, max_attempts=max_attempts, state="queued",
        url=url, title=title, meta=meta,
    )  # fmt: skip
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: int) -> Job | None:
    return session.get(Job, job_id)


def counts_by_state(session: Session) -> dict[str, int]:
    return job_counts(session)


def list_jobs(
    session: Session, *, state: str | None = None, limit: int = 50, before: int | None = None
) -> tuple[list[Job], int]:
    """Newest first, `limit` jobs with ids below `before` (the cursor); and how many match over all pages."""
    if state is not None and state not in JOB_STATES:
        raise ValueError(f"job state must be one of {JOB_STATES}, got {state!r}")
    where = [Job.state == state] if state is not None else []
    total = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    page = select(Job).where(*where)
    if before is not None:
        page = page.where(Job.id < before)
    return list(session.scalars(page.order_by(Job.id.desc()).limit(limit))), total


def _settle_video(session: Session, job: Job, status: str, error: str | None) -> None:
    """An ingest job's video follows the job when it is cancelled or retried (a reindex leaves it as it is)."""
    if job.kind != "ingest" or job.video_id is None:
        return
    video = session.get(Video, job.video_id)
    if video is not None and video.status not in ("deleted", "ready"):
        video.status, video.error = status, error


def cancel(session: Session, job_id: int, *, now: datetime | None = None) -> Job | None:
    """Cancel a queued or running job (its worker stops between stages and commits nothing); None if unknown.

    One conditional UPDATE: a worker committing the job at the same moment either wins (the job is ready
    and this raises JobStateError) or loses its lease and rolls back.
    """
    now = now or utcnow()
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(OPEN_STATES))
        .values(state="cancelled", error=CANCELLED_REASON, lease_owner=None, lease_expires_at=None,
                finished_at=now, updated_at=now),
        execution_options={"synchronize_session": False},
    )  # fmt: skip
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return None
    if not done.rowcount:  # type: ignore[attr-defined]
        raise JobStateError(f"job {job_id} is {job.state}; only a queued or running job can be cancelled")
    _settle_video(session, job, "failed", CANCELLED_REASON)
    session.flush()
    logger.info("job %s cancelled", job_id)
    return job


def retry(session: Session, job_id: int, *, now: datetime | None = None) -> Job | None:
    """Put a failed or cancelled job back in the queue with a fresh set of attempts; None if unknown."""
    now = now or utcnow()
    job = session.get(Job, job_id, populate_existing=True, with_for_update=True)
    if job is None:
        return None
    if job.state not in RETRYABLE_STATES:
        raise JobStateError(f"job {job_id} is {job.state}; only a failed or cancelled job can be retried")
    video = session.get(Video, job.video_id) if job.video_id is not None else None
    if video is not None and video.status == "deleted":
        raise JobStateError(f"the video of job {job_id} was deleted; add it again instead of retrying")
    job.state, job.progress, job.error, job.attempts = "queued", 0.0, None, 0
    job.run_after, job.finished_at, job.bytes_done, job.bytes_total = now, None, None, None
    _settle_video(session, job, "pending", None)
    session.flush()
    logger.info("job %s queued again", job_id)
    return job


def _lease_expired(now: datetime) -> ColumnElement[bool]:
    return and_(Job.state.in_(ACTIVE_STATES), Job.lease_expires_at < now)


def claim_next(
    session: Session, worker_id: str, lease_s: float = 60, *, now: datetime | None = None
) -> Job | None:
    """Take the oldest runnable job (queued and due, or abandoned by a dead worker) under a lease.

    Commit soon after: on PostgreSQL the claimed row stays locked until then.
    """
    now = now or utcnow()
    # A job whose worker died on its last allowed attempt is not retried for ever.
    session.execute(
        update(Job)
        .where(_lease_expired(now), Job.attempts >= Job.max_attempts)
        .values(
            state="failed",
            error="the worker stopped renewing its lease (crashed or hung) on the last allowed attempt",
            lease_owner=None,
            lease_expires_at=None,
            finished_at=now,
            updated_at=now,
        ),
        execution_options={"synchronize_session": False},
    )
    claimable = or_(and_(Job.state == "queued", Job.run_after <= now), _lease_expired(now))
    # PostgreSQL: SKIP LOCKED lets concurrent workers pass over a row another one is claiming.
    # SQLite ignores FOR UPDATE; the single UPDATE statement runs under its database write lock.
    pick = (
        select(Job.id)
        .where(claimable)
        .order_by(Job.run_after, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    job_id = session.execute(
        update(Job)
        .where(Job.id == pick, claimable)
        .values(
            # A URL job that has not made its video yet starts by downloading it.
            state=case((and_(Job.url.is_not(None), Job.video_id.is_(None)), "downloading"), else_="decoding"),
            lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_s),
            attempts=Job.attempts + 1,
            updated_at=now,
        )
        .returning(Job.id),
        execution_options={"synchronize_session": False},
    ).scalar_one_or_none()
    if job_id is None:
        return None
    job = session.get(Job, job_id, populate_existing=True)
    logger.info("worker %s claimed job %s (attempt %s)", worker_id, job_id, job.attempts if job else "?")
    return job


def heartbeat(
    session: Session, job_id: int, worker_id: str, lease_s: float = 60, *, now: datetime | None = None
) -> bool:
    """Extend the lease; False means the worker lost the job (expired and taken over) and must stop."""
    now = now or utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.state.in_(ACTIVE_STATES))
        .values(lease_expires_at=now + timedelta(seconds=lease_s), updated_at=now),
        execution_options={"synchronize_session": False},
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _owned(session: Session, job_id: int, worker_id: str | None) -> Job | None:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or (worker_id is not None and job.lease_owner != worker_id):
        return None
    return job


def set_state(
    session: Session, job_id: int, state: str, progress: float | None = None, *, worker_id: str | None = None
) -> Job | None:
    """Record a running job's stage and progress (0..1); None if unknown or (with worker_id) not ours."""
    if state not in ACTIVE_STATES:
        raise ValueError(f"set_state takes one of {ACTIVE_STATES}, got {state!r}; use complete() or fail()")
    if progress is not None and not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be within 0..1, got {progress}")
    job = _owned(session, job_id, worker_id)
    if job is not None:
        job.state = state
        if progress is not None:
            job.progress = progress
        session.flush()
    return job


def release(session: Session, job_id: int, *, worker_id: str, now: datetime | None = None) -> Job | None:
    """Give a claimed job back to the queue untouched (this worker is stopping): the try does not count."""
    now = now or utcnow()
    job = _owned(session, job_id, worker_id)
    if job is not None and job.state in ACTIVE_STATES:
        job.state, job.attempts, job.lease_owner, job.lease_expires_at = (
            "queued",
            job.attempts - 1,
            None,
            None,
        )
        job.run_after, job.bytes_done, job.bytes_total, job.progress = now, None, None, 0.0
        session.flush()
        return job
    return None


def set_download(
    session: Session, job_id: int, done: int, total: int | None, *, worker_id: str | None = None
) -> Job | None:
    """Record a download's bytes so far (and the total, when the server said); None if not ours."""
    job = _owned(session, job_id, worker_id)
    if job is not None and job.state == "downloading":
        job.bytes_done, job.bytes_total = done, total
        job.progress = min(1.0, done / total) if total else 0.0
        session.flush()
    return job


def attach_video(session: Session, job_id: int, video_id: int, *, worker_id: str | None = None) -> Job | None:
    """A URL job's download became video `video_id`: the job goes on to index it; None if not ours."""
    job = _owned(session, job_id, worker_id)
    if job is not None and job.state in ACTIVE_STATES:
        job.video_id, job.state, job.progress = video_id, "decoding", 0.0
        session.flush()
        return job
    return None


def complete(session: Session, job_id: int, *, worker_id: str | None = None) -> Job | None:
    job = _owned(session, job_id, worker_id)
    if job is not None:
        job.state, job.progress, job.error = "ready", 1.0, None
        job.lease_owner, job.lease_expires_at, job.finished_at = None, None, utcnow()
        session.flush()
    return job


def postpone(
    session: Session, job_id: int, error: str, delay: timedelta, *, worker_id: str | None = None
) -> Job | None:
    """Back to the queue after `delay` without spending an attempt: an outage elsewhere (the vector
    database) is not the video's fault, so the job waits it out however long it lasts."""
    job = _owned(session, job_id, worker_id)
    if job is None:
        return None
    job.error, job.lease_owner, job.lease_expires_at = error, None, None
    job.state, job.run_after = "queued", utcnow() + delay
    job.attempts = max(0, job.attempts - 1)
    logger.warning("job %s postponed by %s: %s", job_id, delay, error)
    session.flush()
    return job


def fail(
    session: Session,
    job_id: int,
    error: str,
    retryable: bool,
    *,
    worker_id: str | None = None,
    now: datetime | None = None,
) -> Job | None:
    """Retryable failures go back to the queue after a back-off until max_attempts; others fail at once."""
    now = now or utcnow()
    job = _owned(session, job_id, worker_id)
    if job is None:
        return None
    job.error, job.lease_owner, job.lease_expires_at = error, None, None
    if retryable and job.attempts < job.max_attempts:
        job.state = "queued"
        job.run_after = now + backoff_delay(job.attempts)
        logger.warning(
            "job %s failed (attempt %s/%s), retrying at %s: %s",
            job_id,
            job.attempts,
            job.max_attempts,
            job.run_after.isoformat(),
            error,
        )
    else:
        job.state, job.finished_at = "failed", now
        logger.error("job %s failed for good after %s attempt(s): %s", job_id, job.attempts, error)
    session.flush()
    return job
