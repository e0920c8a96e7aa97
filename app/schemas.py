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
    StrictStr,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from app.page_tokens import MAX_RESULT_DEPTH

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000
MAX_TITLE_CHARS = 500
MAX_FILTER_VIDEO_IDS = 1000
MAX_FILTER_META_KEYS = 20
MAX_PAGE_TOKEN_CHARS = 512

MetaKey = Annotated[str, StringConstraints(min_length=1, max_length=100)]
MetaValue = Annotated[StrictStr, StringConstraints(max_length=1000)]


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
    meta: dict[MetaKey, MetaValue] | None = Field(
        default=None,
        max_length=MAX_FILTER_META_KEYS,
        description="videos whose meta (the JSON object given at upload) holds every one of these keys "
        'with exactly this string value, e.g. {"camera": "gopro"}; values must be strings '
        f"(up to {MAX_FILTER_META_KEYS} keys)",
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
    min_score: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="hits scoring below this are not results (score: two-stage with rerank, else broad); "
        "omitted or null: the model's calibrated cut-off (GET /health, model.cutoff), none if it has "
        "none; 0 keeps every hit with a non-negative score",
    )
    page_token: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_PAGE_TOKEN_CHARS,
        description="the next_page_token of the previous response, for the page after it; with the "
        f"same query, filter, rerank, group_by and min_score (paging stops at result {MAX_RESULT_DEPTH})",
    )

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
    below_threshold: bool = Field(
        default=False, description="true for a best guess that scored below the cut-off (best_guesses)"
    )


class ModelInfo(BaseModel):
    id: str
    top_k: int
    reranked: bool = Field(description="whether the focused view ran for this query")


class CutoffInfo(BaseModel):
    min_score: float | None = Field(description="the cut-off this search applied; null: none")
    source: Literal["request", "model", "none"] = Field(
        description="request: the request's min_score; model: the model's calibrated cut-off; "
        "none: no min_score and the model has no calibration"
    )
    precision_target: float | None = Field(
        description="with source model: the top-1 precision the cut-off was calibrated for"
    )


class SearchResponse(BaseModel):
    query: str
    results: list[SearchHit] = Field(description="this page's hits at or above the cut-off, best first")
    no_good_match: bool = Field(
        description="true when a cut-off applied and no hit reached it; best_guesses then holds the best hits"
    )
    best_guesses: list[SearchHit] = Field(
        description="when no_good_match: up to `limit` best hits anyway, each below_threshold; else empty"
    )
    cutoff: CutoffInfo = Field(description="the cut-off this search applied, and where it came from")
    offset: int = Field(description="how many results came before this page")
    next_page_token: str | None = Field(
        description="send it back as page_token for the next page; null when there is none "
        f"(the last result, or result {MAX_RESULT_DEPTH} reached)"
    )
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
    video_id: int | None = Field(description="null for a URL until its job has downloaded it")
    job_id: int | None
    status: str = Field(
        description="the video's status: pending, indexing, ready or failed; queued for a URL to download"
    )
    duplicate_of: int | None = Field(description="set when an identical file was already in the library")


JobState = Literal["queued", "downloading", "decoding", "encoding", "ready", "failed", "cancelled"]


class JobPublic(BaseModel):
    id: int
    kind: str
    video_id: int | None = Field(description="null while a URL job has not downloaded its video yet")
    state: JobState = Field(
        description="queued, downloading (a URL), decoding, encoding, ready, failed or cancelled"
    )
    progress: float = Field(description="0..1 within the current stage")
    error: str | None = Field(description="why the job failed or was cancelled, or why the last try failed")
    attempts: int
    max_attempts: int
    url: str | None = Field(description="the URL a URL job downloads")
    title: str | None = Field(description="the title of the job's video (or the one asked for a URL)")
    bytes_done: int | None = Field(description="a URL job: bytes downloaded so far")
    bytes_total: int | None = Field(description="a URL job: the file's size, when its server said it")
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class JobsPublic(BaseModel):
    data: list[JobPublic] = Field(description="newest first")
    count: int = Field(description="jobs matching the filter, over all pages")
    next_cursor: int | None = Field(description="pass as `cursor` for the next page; null on the last one")


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


class HealthCutoff(BaseModel):
    min_score: float | None = Field(description="default cut-off of a search with rerank; null: none")
    broad_min_score: float | None = Field(description="default cut-off of a search without rerank")
    precision_target: float | None = Field(description="top-1 precision it was calibrated for")
    validation_queries: int | None = Field(description="validation queries it was measured on")
    calibrated_at: str | None = Field(description="when it was measured (ISO 8601, UTC)")
    note: str = Field(description="where the cut-off comes from, or why there is none")


class HealthModel(BaseModel):
    id: str
    device: str
    precision: str
    top_k: int
    num_frames: int
    dim: int
    cutoff: HealthCutoff


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


class HealthFeed(BaseModel):
    position: int = Field(description="every change of this model's feed up to this seq is in the index")
    head: int = Field(description="the newest seq of this model's change feed seen")
    lag_rows: int = Field(description="changes of this model committed but not applied yet")
    lag_seconds: float = Field(description="how long the oldest of them has been waiting; 0 when caught up")
    max_lag_seconds: float = Field(description="above this lag the replica is not ready (TVS_MAX_FEED_LAG_S)")


HealthStatus = Literal[
    "ok",
    "starting",
    "database unreachable",
    "vector database unreachable",
    "catching up with the change feed",
]


class HealthResponse(BaseModel):
    status: HealthStatus
    ready: bool
    model: HealthModel | None
    index: HealthIndex | None
    feed: HealthFeed | None = Field(
        default=None, description="this replica's place in the change feed; null while starting"
    )
    worker: bool = Field(description="whether this process runs an indexing worker thread")
    auth_required: bool = Field(description="whether an API key is configured (writes need it)")
    public_read: bool = Field(description="whether search, the video list and media answer without a key")
    max_upload_bytes: int


class Problem(BaseModel):
    """Every error body: a message for people and a stable code for programs (docs/errors.md)."""

    detail: str
    code: str = Field(description="machine-readable error code, stable across releases (docs/errors.md)")
