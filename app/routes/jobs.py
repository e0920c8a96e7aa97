"""GET /jobs/{id}: an ingestion job's state, progress and error."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path

from app import library
from app.deps import SessionDep
from app.errors import ApiError
from app.schemas import JobPublic, Problem

logger = logging.getLogger(__name__)

router = APIRouter(tags=["library"])

MAX_ID = 2**63 - 1
IdParam = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.get("/jobs/{job_id}", response_model=JobPublic, responses={404: {"model": Problem}})
def get_job(job_id: IdParam, session: SessionDep) -> JobPublic:
    job = library.get_job(session, job_id=job_id)
    if job is None:
        raise ApiError("job_not_found", f"no job {job_id}")
    return job
