"""The search service function: an API request in, the two-stage searcher's answer out as the API shape."""

from __future__ import annotations

import logging
import math
import time

from app.cutoff import DefaultCutoff
from app.library import hit_public
from app.metrics import Metrics
from app.page_tokens import MAX_RESULT_DEPTH, decode_page_token, encode_page_token, search_digest
from app.schemas import CutoffInfo, ModelInfo, SearchRequest, SearchResponse
from app.search_types import Hit, SearchFilter, SearchQuery
from app.searcher import Searcher

logger = logging.getLogger(__name__)


def to_filter(body: SearchRequest) -> SearchFilter:
    f = body.filter
    if f is None:
        return SearchFilter()
    return SearchFilter(
        video_ids=frozenset(f.video_ids) if f.video_ids is not None else None,
        min_duration_s=f.min_duration,
        max_duration_s=f.max_duration,
        created_after=f.created_after,
        created_before=f.created_before,
        meta=tuple(sorted(f.meta.items())) if f.meta is not None else None,
    )


def resolve_cutoff(body: SearchRequest, default: DefaultCutoff) -> CutoffInfo:
    if body.min_score is not None:
        return CutoffInfo(min_score=body.min_score, source="request", precision_target=None)
    min_score = default.min_score(body.rerank)
    if min_score is None or default.calibration is None:
        return CutoffInfo(min_score=None, source="none", precision_target=None)
    return CutoffInfo(
        min_score=min_score, source="model", precision_target=default.calibration.precision_target
    )


def _digest(body: SearchRequest, cutoff: CutoffInfo, model_id: str) -> str:
    fields = body.model_dump(mode="json", exclude={"limit", "page_token", "min_score"})
    return search_digest({**fields, "min_score": cutoff.min_score, "model": model_id})


def _finite(hits: list[Hit]) -> list[Hit]:
    return [h for h in hits if math.isfinite(h.score) and math.isfinite(h.broad_score)]


async def run_search(
    searcher: Searcher, body: SearchRequest, metrics: Metrics | None = None
) -> SearchResponse:
    """Raises app.page_tokens.PageTokenError for a page_token that does not fit this search."""
    cutoff = resolve_cutoff(body, searcher.default_cutoff)
    digest = _digest(body, cutoff, searcher.model.model_id)
    offset = decode_page_token(body.page_token, digest) if body.page_token is not None else 0
    limit = min(body.limit, MAX_RESULT_DEPTH - offset)
    query = SearchQuery(
        body.query, limit, body.rerank, body.group_by, to_filter(body), offset, cutoff.min_score
    )
    start = time.perf_counter()
    outcome = await searcher.search(query)
    elapsed_ms = (time.perf_counter() - start) * 1000
    timings = {name: round(ms, 3) for name, ms in outcome.timings_ms.items()}
    # Time spent waiting for a batch to form (or for the previous one to finish).
    timings["queue"] = round(max(0.0, elapsed_ms - outcome.timings_ms["total"]), 3)
    hits = _finite(outcome.hits)
    page = hits[offset : offset + limit]
    more = len(hits) > offset + limit and offset + limit < MAX_RESULT_DEPTH
    guesses = _finite(outcome.below) if not hits and offset == 0 else []
    if metrics is not None:
        metrics.searches.inc()
        metrics.search_batch_size.observe(outcome.batch_size)
    return SearchResponse(
        query=body.query,
        results=[hit_public(hit, rank) for rank, hit in enumerate(page, start=offset + 1)],
        no_good_match=bool(guesses),  # an empty library (nothing to guess) is not a failed match
        best_guesses=[hit_public(hit, rank, below_threshold=True) for rank, hit in enumerate(guesses, 1)],
        cutoff=cutoff,
        offset=offset,
        next_page_token=encode_page_token(offset + limit, digest) if more else None,
        timings_ms=timings,
        batch_size=outcome.batch_size,
        model=ModelInfo(id=searcher.model.model_id, top_k=searcher.top_k, reranked=outcome.reranked),
    )
