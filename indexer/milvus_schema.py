"""What the Milvus backend sends and connects with: the settings, the CLS index spec, collection names, the
row and field layout, filter expressions, and the client connection (indexer.milvus_index uses them)."""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from indexer.errors import IndexerError, UserError

PK, VIDEO, START, END, CREATED, DURATION, CLS, TOKENS = (
    "id",
    "video_id",
    "start",
    "end",
    "created_at",
    "duration",
    "cls",
    "tokens",
)
_SEARCH_KEYS = {"nprobe", "ef", "itopk_size", "search_width", "search_list", "radius", "range_filter"}


class MilvusUnavailableError(IndexerError, RuntimeError):
    """The vector database could not be reached or refused a call; the caller may retry later."""


class MilvusIndexSpecError(IndexerError, UserError, ValueError):
    """TVS_MILVUS_INDEX is not `TYPE` or `TYPE:key=value,...`."""


class SegmentFilterLike(Protocol):
    """What a pushed-down filter carries (app.search_types.SearchFilter has these fields)."""

    @property
    def video_ids(self) -> frozenset[int] | None: ...
    @property
    def min_duration_s(self) -> float | None: ...
    @property
    def max_duration_s(self) -> float | None: ...
    @property
    def created_after(self) -> datetime | None: ...
    @property
    def created_before(self) -> datetime | None: ...


@dataclass(frozen=True)
class MilvusConfig:
    """Where the collection lives and how its CLS field is indexed.

    uri: a file path ending in `.db` (Milvus Lite, embedded) or `http://host:19530` (a server or cluster).
    """

    uri: str
    token: str = ""
    index_type: str = "FLAT"
    index_params: dict[str, Any] = field(default_factory=dict)
    search_params: dict[str, Any] = field(default_factory=dict)
    prefix: str = "tvs"
    timeout_s: float = 10.0


def parse_index_spec(spec: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """`FLAT`, `IVF_FLAT:nlist=1024,nprobe=16`, `HNSW:M=16,efConstruction=200,ef=64` -> (type, build, search)."""
    kind, _, rest = spec.strip().partition(":")
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", kind):
        raise MilvusIndexSpecError(
            f"TVS_MILVUS_INDEX={spec!r}: expected an index type such as FLAT, IVF_FLAT or HNSW, "
            "optionally followed by ':key=value,...' (e.g. IVF_FLAT:nlist=1024,nprobe=16)"
        )
    build: dict[str, Any] = {}
    search: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise MilvusIndexSpecError(f"TVS_MILVUS_INDEX={spec!r}: {part!r} is not key=value")
        number: Any = float(value) if "." in value else int(value) if value.strip().isdigit() else value
        (search if key.strip() in _SEARCH_KEYS else build)[key.strip()] = number
    return kind, build, search


def collection_name(prefix: str, model_id: str) -> str:
    """A valid Milvus name for a model id (letters, digits, `_`), unique by a hash of the exact id."""
    readable = milvus_safe(model_id)[:48]
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:10]
    return f"{milvus_safe(prefix)}_{readable}_{digest}"


def milvus_safe(text: str) -> str:
    """`text` with every character a Milvus name cannot hold (all but letters, digits and `_`) as `_`."""
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def filter_expression(f: SegmentFilterLike | None) -> str:
    """The Milvus boolean expression for a search filter ('' for none)."""
    if f is None:
        return ""
    parts = []
    if f.video_ids is not None:
        parts.append(f"{VIDEO} in [{', '.join(str(int(v)) for v in sorted(f.video_ids))}]")
    if f.min_duration_s is not None:
        parts.append(f"{DURATION} >= {float(f.min_duration_s)!r}")
    if f.max_duration_s is not None:
        parts.append(f"{DURATION} <= {float(f.max_duration_s)!r}")
    if f.created_after is not None:
        parts.append(f"{CREATED} > {micros(f.created_after)}")
    if f.created_before is not None:
        parts.append(f"{CREATED} < {micros(f.created_before)}")
    return " and ".join(parts)


def micros(t: datetime) -> int:
    # The catalog stores naive UTC datetimes.
    aware = t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)
    return int(aware.timestamp() * 1_000_000)


@dataclass(frozen=True)
class SegmentRow:
    """One segment as the collection stores it."""

    id: int
    video_id: int
    start_s: float
    end_s: float
    created_at: datetime
    duration_s: float | None


def connect(config: MilvusConfig, attempts: int = 5) -> Any:
    """A MilvusClient; Milvus Lite's server may need a moment to open its socket, so retry briefly."""
    from pymilvus import MilvusClient

    last: Exception | None = None
    for n in range(attempts):
        try:
            return MilvusClient(uri=config.uri, token=config.token, timeout=config.timeout_s)
        except Exception as e:  # pymilvus raises several types for "cannot connect"
            last = e
            time.sleep(0.3 * (n + 1))
    raise MilvusUnavailableError(
        f"cannot reach Milvus at {config.uri} ({last}); check TVS_MILVUS_URI and that the server is up"
    ) from last
