"""Write-side job functions for the API: cancel a queued or running job, retry a failed or cancelled one."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from app.library import get_job
from app.schemas import JobPublic
from indexer import jobs

logger = logging.getLogger(__name__)


def cancel_job(session: Session, *, job_id: int) -> JobPublic | None:
    """None for an unknown job; jobs.JobStateError for one that has already finished."""
    if jobs.cancel(session, job_id) is None:
        return None
    session.commit()
    return get_job(session, job_id=job_id)


def retry_job(session: Session, *, job_id: int) -> JobPublic | None:
    """None for an unknown job; jobs.JobStateError for one that is not failed or cancelled."""
    if jobs.retry(session, job_id) is None:
        return None
    session.commit()
    return get_job(session, job_id=job_id)
