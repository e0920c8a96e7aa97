"""POST /search: the two-stage text-to-video search."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, status

from app.batching import BatcherClosedError
from app.deps import MetricsDep, SearcherDep
from app.schemas import Problem, SearchRequest, SearchResponse
from app.search_service import run_search
from indexer.milvus_index import MilvusUnavailableError

logger = logging.getLogger(__name__)

router = APIRouter(tags=["search"])


@router.post(
    "/search",
    response_model=SearchResponse,
    responses={
        400: {"model": Problem, "description": "the body is not JSON text (e.g. not valid UTF-8)"},
        503: {"model": Problem, "description": "starting or shutting down, or the vector database is down"},
    },
    summary="Find the moments that match a sentence",
)
async def search(body: SearchRequest, searcher: SearcherDep, metrics: MetricsDep) -> SearchResponse:
    try:
        return await run_search(searcher, body, metrics)
    except BatcherClosedError as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from e
    except MilvusUnavailableError as e:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"search is unavailable: the vector database cannot be reached ({e}); try again shortly",
        ) from e
