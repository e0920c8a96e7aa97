"""Request and response shapes of the HTTP API (fixed: every response is one of these models)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    WithJsonSchema,
    field_validator,
    model_validator,
)

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000
MAX_TITLE_CHARS = 500
MAX_FILTER_VIDEO_IDS = 1000


def _date_text(value: Any) -> Any:
    # pydantic would read a bare number as a Unix time; the schema promises a date or date-time string.
    if isinstance(value, int | float):
        raise ValueError("give a date or date-time as text, e.g. 2024-05-01 or 2024-05-01T12:00:00Z")
    return value


# A date-time (RFC 3339) or a date (midnight UTC), as text.
DateTimeText = Annotated[
    datetime,
    BeforeValidator(_date_text),
    WithJsonSchema(
        {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "string", "format": "date"}]}
    ),
]


def _utc(value: datetime | None) -> datetime | None:
    # A date without a zone is read as UTC, the zone the catalog stores.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


class SearchFilterIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    video_ids: list[int] | None = Field(default=None, max_length=MAX_FILTER_VIDEO_IDS)
    min_duration: float | None = Field(default=None, ge=0, description="seconds, inclusive")
    max_duration: float | None = Field(default=None, ge=0, description="seconds, inclusive")
    created_after: DateTimeText | None = Field(
        default=None, description="exclusive; UTC when no zone is given"
    )
    created_before: DateTimeText | None = Field(
        default=None, description="exclusive; UTC when no zone is given"
    )

    @field_validator("created_after", "created_before")
    @classmethod
    def _zone(cls, value: datetime | None) -> datetime | None:
        return _utc(value)

    @model_validator(mode="after")
    def _ranges(self) -> SearchFilterIn:
        if self.min_duration is not None and self.max_duration is not None:
            if self.min_duration > self.max_duration:
                raise ValueError("min_duration must not be larger than max_duration")
        if self.created_after is not None and self.created_before is not None:
            if self.created_after >= self.created_before:
                raise ValueError("created_after must be earlier than created_before")
        return self


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(
        # At least one non-space character: the schema says what the validator below enforces (and words).
        json_schema_extra={"pattern": r"\S"},
        description="what to look for, in plain words (1 to 1,000 characters)",
    )
    limit: int = Field(default=10, ge=1, le=100, description="how many results (1 to 100)")
    rerank: bool = Field(
        default=True, strict=True, description="apply the focused view to the broad view's top-k"
    )
    group_by: Literal["segment", "video"] = "segment"
    filter: SearchFilterIn | None = None

    @field_validator("query")
    @classmethod
    def _query_text(cls, value: str) -> str:
        text = value.strip()
        if not text:
            raise ValueError("the query is empty: type a few words describing the moment you are looking for")
        _require_unicode(text, "the query")
        if len(text) > MAX_QUERY_CHARS:
            raise ValueError(
                f"the query is {len(text)} characters long; keep it to {MAX_QUERY_CHARS} or fewer"
            )
        return text


def _require_unicode(text: str, what: str) -> None:
    # JSON may escape a lone surrogate (\\ud800); it is not text and cannot be stored or sent back.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode text (a lone surrogate at position {e.start})") from e


class SearchHit(BaseModel):
    rank: int = Field(description="1-based position in these results")
    video_id: int
    title: str | None
    segment_id: int
    ordinal: int = Field(description="the segment's position within its video")
    start: float = Field(description="seconds")
    end: float = Field(description="seconds")
    score: float = Field(description="final score: broad_score + delta inside the re-ranked top-k")
    broad_score: float = Field(description="broad view: cosine of the query and the segment")
    delta: float | None = Field(description="focused-view correction; null outside the re-ranked top-k")
    broad_rank: int = Field(description="1-based rank by broad_score")
    evidence_time: float | None = Field(
        description="seconds into the video: the frame the focused view's attention weighted most"
    )
    thumbnail_url: str | None
    media_url: str = Field(description="the video with a #t=start,end media fragment")


class ModelInfo(BaseModel):
    id: str
    top_k: int
    reranked: bool = Field(description="whether the focused view ran for this query")


class SearchResponse(BaseModel):
    query: str
    results: list[SearchHit]
    timings_ms: dict[str, float] = Field(
        description="per stage (encode, faiss, catalog, tokens, rerank) for the batch this query ran in, "
        "plus queue (waiting for the batch) and total"
    )
    batch_size: int = Field(description="how many concurrent queries shared this forward pass")
    model: ModelInfo


class IngestSourceIn(BaseModel):
    """JSON body of POST /videos: exactly one of `path` or `url`."""

    # The schema says "exactly one" too, so generated clients and fuzzers know both together are refused.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["path"], "properties": {"path": {"type": "string"}, "url": {"type": "null"}}},
                {"required": ["url"], "properties": {"url": {"type": "string"}, "path": {"type": "null"}}},
            ]
        },
    )

    path: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        # Absolute (or ~/...), no NUL byte: a relative path is refused by the schema, not later by the server.
        pattern=r"^[/~][^\x00]*$",
        description="an absolute file path (or ~/...) inside one of the server's TVS_ALLOWED_ROOTS",
    )
    url: HttpUrl | None = None
    title: str | None = Field(default=None, max_length=MAX_TITLE_CHARS)
    meta: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> IngestSourceIn:
        if (self.path is None) == (self.url is None):
            raise ValueError('give exactly one of "path" (a file on the server) or "url"')
        return self


class IngestResponse(BaseModel):
    video_id: int
    job_id: int | None
    status: str = Field(description="the video's status: pending, indexing, ready or failed")
    duplicate_of: int | None = Field(description="set when an identical file was already in the library")


class JobPublic(BaseModel):
    id: int
    kind: str
    video_id: int | None
    state: str = Field(description="queued, decoding, encoding, ready or failed")
    progress: float
    error: str | None
    attempts: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class SegmentPublic(BaseModel):
    id: int
    ordinal: int
    start: float
    end: float
    thumbnail_url: str | None


class VideoPublic(BaseModel):
    id: int
    title: str | None
    filename: str | None
    status: str
    error: str | None
    size_bytes: int | None
    duration: float | None
    fps: float | None
    width: int | None
    height: int | None
    meta: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    media_url: str
    thumbnail_url: str | None


class VideoDetail(VideoPublic):
    segments: list[SegmentPublic]
    latest_job: JobPublic | None


class VideosPublic(BaseModel):
    data: list[VideoPublic]
    count: int = Field(description="total number of videos matching, over all pages")
    offset: int
    limit: int


class HealthModel(BaseModel):
    id: str
    device: str
    precision: str
    top_k: int
    num_frames: int
    dim: int


class HealthIndex(BaseModel):
    size: int
    type: str = Field(
        description="the FAISS factory in use (Flat while a library is too small to train another), or "
        "milvus:TYPE with TVS_VECTOR_BACKEND=milvus"
    )
    device: str = Field(
        description='where the index lives: "cpu" or "cuda:N" (TVS_INDEX_DEVICE), or "milvus"'
    )
    device_reason: str | None = Field(description="why the index is on the CPU; null on a GPU")
    nprobe: int | None = Field(description="IVF lists scanned per search; null for other index types")
    ef_search: int | None = Field(description="HNSW candidate pool; null for other index types")
    rerank: int = Field(description="approximate candidates re-scored exactly per search; 0: off")


class HealthResponse(BaseModel):
    status: Literal["ok", "starting", "database unreachable", "vector database unreachable"]
    ready: bool
    model: HealthModel | None
    index: HealthIndex | None
    worker: bool = Field(description="whether this process runs an indexing worker thread")
    auth_required: bool = Field(description="whether write endpoints need an API key")
    max_upload_bytes: int


class Problem(BaseModel):
    detail: str
