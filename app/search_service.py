"""The search service function: an API request in, the two-stage searcher's answer out as the API shape."""

from __future__ import annotations

import logging
import math
import time

from app.library import hit_public
from app.metrics import Metrics
from app.schemas import ModelInfo, SearchRequest, SearchResponse
from app.search_types import SearchFilter, SearchQuery
from app.searcher import Searcher

logger = logging.getLogger(__name__)


def to_query(body: SearchRequest) -> SearchQuery:
    f = body.filter
    search_filter = SearchFilter()
    if f is not None:
        search_filter = SearchFilter(
            video_ids=frozenset(f.video_ids) if f.video_ids is not None else None,
            min_duration_s=f.min_duration,
            max_duration_s=f.max_duration,
            created_after=f.created_after,
            created_before=f.created_before,
        )
    return SearchQuery(body.query, body.limit, body.rerank, body.group_by, search_filter)


async def run_search(
    searcher: Searcher, body: SearchRequest, metrics: Metrics | None = None
) -> SearchResponse:
    start = time.perf_counter()
    outcome = await searcher.search(to_query(body))
    elapsed_ms = (time.perf_counter() - start) * 1000
    timings = {name: round(ms, 3) for name, ms in outcome.timings_ms.items()}
    # Time spent waiting for a batch to form (or for the previous one to finish).
    timings["queue"] = round(max(0.0, elapsed_ms - outcome.timings_ms["total"]), 3)
    hits = [h for h in outcome.hits if math.isfinite(h.score) and math.isfinite(h.broad_score)]
    if metrics is not None:
        metrics.searches.inc()
        metrics.search_batch_size.observe(outcome.batch_size)
    return SearchResponse(
        query=body.query,
        results=[hit_public(hit, rank) for rank, hit in enumerate(hits, start=1)],
        timings_ms=timings,
        batch_size=outcome.batch_size,
        model=ModelInfo(id=searcher.model.model_id, top_k=searcher.top_k, reranked=outcome.reranked),
    )
