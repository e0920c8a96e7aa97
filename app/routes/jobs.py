"""Jobs: list them, read one (state, progress, error), cancel a queued or running one, retry a stopped one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from sqlalchemy.orm import Session

from app import library
from app.deps import READ_PROBLEMS, WRITE_PROBLEMS, KeyAccess, SessionDep, WriteAccess
from app.errors import ApiError, user_error
from app.job_control import cancel_job, retry_job
from app.schemas import JobPublic, JobsPublic, JobState, Problem
from indexer.jobs import JobStateError

logger = logging.getLogger(__name__)

# Jobs need a key even with TVS_PUBLIC_READ: they belong to whoever uploads.
router = APIRouter(tags=["library"], dependencies=[KeyAccess], responses=READ_PROBLEMS)

MAX_ID = 2**63 - 1
IdParam = Annotated[int, Path(ge=1, le=MAX_ID)]


def _problem(code: int, description: str) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Problem, "description": description}}


@router.get("/jobs", response_model=JobsPublic, summary="Jobs, newest first, optionally in one state")
def list_jobs(
    session: SessionDep,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 24,
    cursor: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="`next_cursor` of the last page")
    ] = None,
) -> JobsPublic:
    return library.list_jobs(session, state=state, limit=limit, cursor=cursor)


@router.get("/jobs/{job_id}", response_model=JobPublic, responses=_problem(404, "no such job"))
def get_job(job_id: IdParam, session: SessionDep) -> JobPublic:
    return _found(library.get_job(session, job_id=job_id), job_id)


def _found(job: JobPublic | None, job_id: int) -> JobPublic:
    if job is None:
        raise ApiError("job_not_found", f"no job {job_id}")
    return job


def _transition(change: Callable[..., JobPublic | None], session: Session, job_id: int) -> JobPublic:
    """Retry or cancel: 404 for no such job, 409 (job_state_conflict) where its state does not allow it."""
    try:
        return _found(change(session, job_id=job_id), job_id)
    except JobStateError as e:  # a UserError: its code is job_state_conflict
        raise user_error(e) from e


@router.post(
    "/jobs/{job_id}/retry",
    response_model=JobPublic,
    dependencies=[WriteAccess],
    summary="Queue a failed or cancelled job again, with a fresh set of attempts",
    responses={
        **WRITE_PROBLEMS,
        **_problem(404, "no such job"),
        **_problem(409, "the job is not failed or cancelled, or its video was deleted"),
    },
)
def retry(job_id: IdParam, session: SessionDep) -> JobPublic:
    return _transition(retry_job, session, job_id)


@router.delete(
    "/jobs/{job_id}",
    response_model=JobPublic,
    dependencies=[WriteAccess],
    summary="Cancel a queued or running job; its worker stops between stages and nothing of it is searchable",
    responses={
        **WRITE_PROBLEMS,
        **_problem(404, "no such job"),
        **_problem(409, "the job has already finished (ready, failed or cancelled)"),
    },
)
def cancel(job_id: IdParam, session: SessionDep) -> JobPublic:
    return _transition(cancel_job, session, job_id)
