"""Two-stage search: text encode -> FAISS broad view -> token reads -> one focused-view forward."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from sqlalchemy.orm import Session, sessionmaker

from app.batching import MicroBatcher
from app.cutoff import DefaultCutoff
from app.search_types import (
    Hit,
    SearchOutcome,
    SearchQuery,
    passes,
)
from indexer import catalog
from indexer.catalog import SegmentInfo
from indexer.token_store import MissingRecordError
from model.openmp import release_openmp_threads
from model.tokenbinder import TokenBinder

logger = logging.getLogger(__name__)

STAGES = ("encode", "faiss", "catalog", "tokens", "rerank")
_FILTER_OVERFETCH = 8  # first guess at how many broad hits a filter lets through: 1 in 8
_GROUP_OVERFETCH = 4  # and how many segments each video brings along


class SegmentIndex(Protocol):
    """What the searcher needs from `indexer.live_index.LiveIndex`."""

    @property
    def size(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def tokens(self, ids: Sequence[int] | np.ndarray) -> np.ndarray: ...


def _pushes_filters_down(index: SegmentIndex) -> bool:
    # indexer.milvus_index.MilvusIndex: search(queries, k, filters) applies them inside the database.
    return bool(getattr(index, "filters_pushdown", False))


@dataclass
class _Pending:
    query: SearchQuery
    cands: list[tuple[SegmentInfo, float]] = field(default_factory=list)  # broad order, filtered
    deltas: np.ndarray | None = None
    evidence: np.ndarray | None = None  # frame index per re-ranked slot


class Searcher:
    """Runs batches of queries through both stages; `search()` is the async entry used by the routes.

    A page past the first (`offset`) ranks the same hits again and skips to it; under a cut-off
    (`min_score`) the hits below it are dropped, a video's best-ranked segment standing for it when grouped.
    Filters and grouping over-fetch from FAISS: a filtered query first asks for 8x the hits it needs
    (a grouped one 4x), drops the ones the catalog rows reject (deleted, other videos, duration or
    creation date outside the range), and if too few survive asks again for 4x more, up to the whole
    index. So a filter that keeps a small fraction of a large library costs extra FAISS calls for that
    query only; FAISS never sees the filter, which keeps every index type (Flat, IVF, HNSW) usable.
    An index that takes filters itself (Milvus: `filters_pushdown`) gets each query's filter instead and
    is asked for k, not 8k; the catalog join still drops what the catalog does not have as live.
    """

    def __init__(
        self,
        model: TokenBinder,
        index: SegmentIndex,
        session_factory: sessionmaker[Session],
        *,
        top_k: int | None = None,
        batch_max_size: int = 8,
        batch_max_wait_s: float = 0.003,
        observe: Callable[[str, float], None] | None = None,
        default_cutoff: DefaultCutoff | None = None,
    ) -> None:
        self.model = model
        self.default_cutoff = default_cutoff or DefaultCutoff(None, "no cut-off: none was given")
        self.index = index
        self._factory = session_factory
        self.top_k = min(top_k or model.config.top_k, model.config.top_k)
        self.num_frames = model.config.num_frames
        self._observe = observe
        self.batcher: MicroBatcher[SearchQuery, SearchOutcome] = MicroBatcher(
            self.search_batch,
            batch_max_size,
            batch_max_wait_s,
            name="search-batch",
            # An idle search thread gives back its OpenMP pool, which would slow the ingest thread's.
            on_idle=release_openmp_threads,
        )

    def warm_up(self) -> None:
        """One encode and one focused-view forward, so the first real query does not pay for lazy set-up."""
        k, T, D = self.top_k, self.num_frames, self.model.config.embed_dim
        with torch.inference_mode():
            text = self.model.encode_queries(["warm up"])
            self.model.rescore_videos(
                text.indicators.to(self.model.dtype),
                torch.zeros(1, k, T, D, dtype=self.model.dtype, device=self.model.device),
                torch.ones(1, k, dtype=torch.bool, device=self.model.device),
            )

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    async def search(self, query: SearchQuery) -> SearchOutcome:
        return await self.batcher.submit(query)

    # ---- the blocking batch -------------------------------------------------------------------------
    def search_batch(self, queries: list[SearchQuery]) -> list[SearchOutcome]:
        timings = dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        pending = [_Pending(q) for q in queries]
        size = self.index.size
        if size:
            with torch.inference_mode():
                text = self.model.encode_queries([q.text for q in queries])
            timings["encode"] = _ms(t0)
            self._broad(pending, text.i1.float().cpu().numpy(), size, timings)
            self._rerank(pending, text.indicators, timings)
        timings["total"] = _ms(t0)
        if self._observe is not None:
            for stage in (*STAGES, "total"):
                self._observe(stage, timings[stage] / 1000)
        outcomes = []
        for p in pending:
            hits, below = self._finish(p)
            outcomes.append(SearchOutcome(hits, dict(timings), len(queries), p.deltas is not None, below))
        return outcomes

    def _need(self, q: SearchQuery) -> int:
        # One hit past the page tells whether another page exists. Under a cut-off up to k of the
        # re-ranked top-k may fall below it (their delta is not known yet), so k more are fetched.
        cut = self.top_k if q.rerank and q.min_score is not None else 0
        return max(q.offset + q.limit + 1 + cut, self.top_k if q.rerank else 0)

    def _enough(self, p: _Pending) -> bool:
        q = p.query
        k = self.top_k if q.rerank else 0
        if len(p.cands) < k:
            return False
        found = len({info.video_id for info, _ in p.cands}) if q.group_by == "video" else len(p.cands)
        if found >= self._need(q):
            return True
        # Past the re-ranked top-k a hit's score is its broad score, which FAISS returns in descending
        # order: once one is below the cut-off, every later one is too.
        below = q.min_score is not None and len(p.cands) > k and p.cands[-1][1] < q.min_score
        return below and found >= q.limit

    def _broad(self, pending: list[_Pending], i1: np.ndarray, size: int, timings: dict[str, float]) -> None:
        fetch = []
        pushdown = _pushes_filters_down(self.index)
        for p in pending:
            n = self._need(p.query)
            if p.query.filter.active and not pushdown:
                n *= _FILTER_OVERFETCH
            if p.query.group_by == "video":
                n *= _GROUP_OVERFETCH
            fetch.append(min(size, n))
        t = time.perf_counter()
        scores, ids = self._search(i1, max(fetch), pending, pushdown)
        timings["faiss"] += _ms(t)
        rows = list(range(len(pending)))
        while rows:
            t = time.perf_counter()
            wanted = {int(i) for r in rows for i in ids[r][: fetch[r]] if i >= 0}
            with_meta = any(pending[r].query.filter.meta is not None for r in rows)
            with self._factory() as session:
                infos = catalog.segment_infos(session, sorted(wanted), with_meta)
            timings["catalog"] += _ms(t)
            retry = []
            for r in rows:
                p, f = pending[r], pending[r].query.filter
                p.cands = [
                    (infos[int(i)], float(s))
                    for s, i in zip(scores[r][: fetch[r]], ids[r][: fetch[r]], strict=True)
                    if int(i) in infos and (not f.active or passes(infos[int(i)], f))
                ]
                if not self._enough(p) and fetch[r] < size:
                    retry.append(r)
            if not retry:
                return
            # Escalate only the queries that came up short, each on its own (rare: selective filters).
            t = time.perf_counter()
            for r in retry:
                fetch[r] = min(size, fetch[r] * 4)
                s, i = self._search(i1[r : r + 1], fetch[r], pending[r : r + 1], pushdown)
                if s.shape[1] > scores.shape[1]:
                    pad = s.shape[1] - scores.shape[1]
                    scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
                    ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
                scores[r, : s.shape[1]], ids[r, : s.shape[1]] = s[0], i[0]
            timings["faiss"] += _ms(t)
            rows = retry

    def _search(
        self, i1: np.ndarray, k: int, pending: list[_Pending], pushdown: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        if not pushdown:
            return self.index.search(i1, k)
        filters = [p.query.filter if p.query.filter.active else None for p in pending]
        return self.index.search(i1, k, filters)  # type: ignore[call-arg]

    def _read_tokens(self, ids: list[int]) -> tuple[np.ndarray, set[int]]:
        try:
            return self.index.tokens(ids), set()
        except MissingRecordError as e:
            # A segment deleted (and freed) between the FAISS search and now: leave its slot empty.
            missing = set(e.ids)
            present = [i for i in ids if i not in missing]
            tokens = np.zeros((len(ids), self.num_frames, self.model.config.embed_dim), np.float16)
            if present:
                got = self.index.tokens(present)
                tokens[[n for n, i in enumerate(ids) if i not in missing]] = got
            return tokens, missing

    def _rerank(self, pending: list[_Pending], indicators: torch.Tensor, timings: dict[str, float]) -> None:
        rows = [n for n, p in enumerate(pending) if p.query.rerank and p.cands]
        if not rows:
            return
        k, T = self.top_k, self.num_frames
        t = time.perf_counter()
        flat_ids = [info.id for n in rows for info, _ in pending[n].cands[:k]]
        tokens, missing = self._read_tokens(flat_ids)
        D = tokens.shape[-1]
        batch = np.zeros((len(rows), k, T, D), np.float16)  # [B', k, T, D] in broad order
        mask = np.zeros((len(rows), k), bool)
        pos = 0
        for b, n in enumerate(rows):
            m = len(pending[n].cands[:k])
            batch[b, :m] = tokens[pos : pos + m]
            mask[b, :m] = [info.id not in missing for info, _ in pending[n].cands[:k]]
            pos += m
        timings["tokens"] += _ms(t)
        t = time.perf_counter()
        model = self.model
        with torch.inference_mode():
            out = model.rescore_videos(
                indicators[rows].to(model.device, model.dtype),
                torch.from_numpy(batch).to(model.device, model.dtype),
                None if mask.all() else torch.from_numpy(mask).to(model.device),  # None: no masking ops
            )
        delta = out.delta.float().cpu().numpy()  # [B', k]
        # The frame each candidate's attention weighted most, summed over the indicator queries.
        evidence = out.attention.float().sum(dim=1).argmax(dim=-1).cpu().numpy()  # [B', k]
        timings["rerank"] += _ms(t)
        for b, n in enumerate(rows):
            m = len(pending[n].cands[:k])
            pending[n].deltas = np.where(mask[b, :m], delta[b, :m], 0.0)
            pending[n].evidence = np.where(mask[b, :m], evidence[b, :m], -1)

    def _finish(self, p: _Pending) -> tuple[list[Hit], list[Hit]]:
        """The ranked hits that reach the cut-off (from the first, one past the page), and, when none
        does, the best `limit` hits anyway."""
        q = p.query
        hits = self._ranked(p)
        if q.min_score is None:
            return hits[: q.offset + q.limit + 1], []
        passing = [h for h in hits if h.score >= q.min_score]
        return passing[: q.offset + q.limit + 1], [] if passing else hits[: q.limit]

    def _ranked(self, p: _Pending) -> list[Hit]:
        hits = []
        for rank, (info, s) in enumerate(p.cands, start=1):
            delta = ev = None
            if p.deltas is not None and rank <= len(p.deltas) and p.evidence is not None:
                delta = float(p.deltas[rank - 1])
                frame = int(p.evidence[rank - 1])
                ev = _frame_time(info.start_s, info.end_s, frame, self.num_frames) if frame >= 0 else None
            hits.append(Hit(info, s + (delta or 0.0), s, delta, rank, ev))
        if p.deltas is not None:
            # Re-ranked top-k sorted by S; ranks beyond k keep broad-view order (stable sort).
            m = len(p.deltas)
            hits[:m] = sorted(hits[:m], key=lambda h: -h.score)
        if p.query.group_by == "video":
            seen: set[int] = set()
            grouped = []
            for hit in hits:
                if hit.segment.video_id not in seen:
                    seen.add(hit.segment.video_id)
                    grouped.append(hit)
            hits = grouped
        return hits


def _frame_time(start: float, end: float, frame: int, num_frames: int) -> float:
    # Frames are sampled at bin centres of the segment (model.video.sample_times).
    return start + (frame + 0.5) * (end - start) / num_frames


def _ms(t: float) -> float:
    return (time.perf_counter() - t) * 1000.0
