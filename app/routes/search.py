"""POST /search: the two-stage text-to-video search."""

from __future__ import annotations

import logging

from fastapi import APIRouter

from app.batching import BatcherClosedError
from app.deps import READ_PROBLEMS, MetricsDep, ReadAccess, SearcherDep
from app.errors import ApiError
from app.page_tokens import PageTokenError
from app.schemas import Problem, SearchRequest, SearchResponse
from app.search_service import run_search
from indexer.milvus_schema import MilvusUnavailableError

logger = logging.getLogger(__name__)

router = APIRouter(tags=["search"], dependencies=[ReadAccess], responses=READ_PROBLEMS)


@router.post(
    "/search",
    response_model=SearchResponse,
    responses={
        400: {
            "model": Problem,
            "description": "a page_token that does not fit this search, or a body that is not JSON text",
        },
        503: {"model": Problem, "description": "starting or shutting down, or the vector database is down"},
    },
    summary="Find the moments that match a sentence",
)
async def search(body: SearchRequest, searcher: SearcherDep, metrics: MetricsDep) -> SearchResponse:
    try:
        return await run_search(searcher, body, metrics)
    except PageTokenError as e:
        raise ApiError("bad_page_token", str(e)) from e
    except BatcherClosedError as e:
        raise ApiError("service_stopping", str(e)) from e
    except MilvusUnavailableError as e:
        raise ApiError(
            "vector_database_unavailable",
            f"search is unavailable: the vector database cannot be reached ({e}); try again shortly",
        ) from e
