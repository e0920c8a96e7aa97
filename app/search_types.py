"""What a search asks and answers: queries, filters, catalog facts about segments, hits."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from indexer.catalog import SegmentInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchFilter:
    video_ids: frozenset[int] | None = None
    min_duration_s: float | None = None
    max_duration_s: float | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    meta: tuple[tuple[str, str], ...] | None = None  # (key, value) pairs the video's meta must hold, all

    @property
    def active(self) -> bool:
        return any(v is not None for v in vars(self).values())


@dataclass(frozen=True)
class SearchQuery:
    text: str
    limit: int = 10
    rerank: bool = True
    group_by: Literal["segment", "video"] = "segment"
    filter: SearchFilter = field(default_factory=SearchFilter)
    offset: int = 0  # hits to skip (a page token's position)
    min_score: float | None = None  # hits scoring below it are not results; None: no cut-off


@dataclass(frozen=True)
class Hit:
    segment: SegmentInfo
    score: float  # S = S' + delta inside the re-ranked top-k, else S'
    broad_score: float  # S' (cosine of I_1 and the segment's CLS)
    delta: float | None  # the focused view's correction; None when it did not look at this segment
    broad_rank: int  # 1-based rank by S' among the segments that passed the filter
    evidence_time: float | None  # seconds into the video: the frame the focused view weighted most


@dataclass
class SearchOutcome:
    hits: list[Hit]  # ranked hits at or above min_score, from the first: up to offset + limit + 1
    timings_ms: dict[str, float]
    batch_size: int
    reranked: bool
    below: list[Hit] = field(default_factory=list)  # when no hit reaches min_score: the best ones anyway


def passes(info: SegmentInfo, f: SearchFilter) -> bool:
    if f.video_ids is not None and info.video_id not in f.video_ids:
        return False
    duration = info.duration_s
    if f.min_duration_s is not None and (duration is None or duration < f.min_duration_s):
        return False
    if f.max_duration_s is not None and (duration is None or duration > f.max_duration_s):
        return False
    if f.created_after is not None and info.created_at <= f.created_after:
        return False
    if f.created_before is not None and info.created_at >= f.created_before:
        return False
    # Equality on strings only: {"fps": 30} stored as a number never equals the filter's "30".
    return f.meta is None or all((info.meta or {}).get(key) == value for key, value in f.meta)
