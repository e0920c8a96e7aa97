"""The job queue: enqueue, claim under a lease, heartbeat, progress, complete, and fail with back-off."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from indexer.catalog import JOB_KINDS, Job, job_counts
from indexer.db import utcnow

logger = logging.getLogger(__name__)

# States of a claimed job; its lease must be renewed (heartbeat) or another worker takes it over.
ACTIVE_STATES = ("decoding", "encoding")
BACKOFF_BASE_S = 5.0
BACKOFF_CAP_S = 600.0


def backoff_delay(attempts: int, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S) -> timedelta:
    """Wait before the next try after `attempts` failed ones: base, 2*base, 4*base, ... up to cap."""
    return timedelta(seconds=min(cap_s, base_s * 2 ** max(0, attempts - 1)))


def enqueue(
    session: Session,
    kind: str,
    video_id: int | None,
    model_id: str | None,
    max_attempts: int = 3,
) -> Job:
    if kind not in JOB_KINDS:
        raise ValueError(f"job kind must be one of {JOB_KINDS}, got {kind!r}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    job = Job(kind=kind, video_id=video_id, model_id=model_id, max_attempts=max_attempts, state="queued")
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: int) -> Job | None:
    return session.get(Job, job_id)


def counts_by_state(session: Session) -> dict[str, int]:
    return job_counts(session)


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
            state="decoding",
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
