"""GET /jobs/{id}: an ingestion job's state, progress and error."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status

from app import library
from app.deps import READ_PROBLEMS, KeyAccess, SessionDep
from app.schemas import JobPublic, Problem

logger = logging.getLogger(__name__)

# Jobs need a key even with TVS_PUBLIC_READ: they belong to whoever uploads.
router = APIRouter(tags=["library"], dependencies=[KeyAccess], responses=READ_PROBLEMS)

MAX_ID = 2**63 - 1
IdParam = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.get("/jobs/{job_id}", response_model=JobPublic, responses={404: {"model": Problem}})
def get_job(job_id: IdParam, session: SessionDep) -> JobPublic:
    job = library.get_job(session, job_id=job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    return job
