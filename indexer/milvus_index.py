"""Milvus as the broad view and token store: one collection per model id, keyed by the catalog's segment id.

The catalog stays the source of truth; a collection is a cache that `indexer rebuild-index --backend milvus`
re-creates from the token store. Writers insert here *before* committing the catalog rows, and the
searcher drops every hit the catalog does not have as a live segment, so a crash in between leaves
nothing searchable (`indexer verify --repair` removes the stray rows).

A little over 400 lines: one backend class (schema, writes, search, tokens) behind the searcher's seam;
the catalog comparison and rebuild are apart (milvus_sync.py).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import numpy as np

from indexer.errors import IndexerError, UserError
from indexer.token_store import MissingRecordError

logger = logging.getLogger(__name__)

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
_TOKEN_CACHE = 4096  # tokens of recent hits, by id (ids are never reused, so an entry never goes stale)
_GET_CHUNK = 256
_SIZE_TTL_S = 1.0


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
    readable = re.sub(r"[^A-Za-z0-9_]", "_", model_id)[:48]
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', prefix)}_{readable}_{digest}"


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
        parts.append(f"{CREATED} > {_micros(f.created_after)}")
    if f.created_before is not None:
        parts.append(f"{CREATED} < {_micros(f.created_before)}")
    return " and ".join(parts)


def _micros(t: datetime) -> int:
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


class MilvusIndex:
    """The `app.searcher.SegmentIndex` seam over one Milvus collection, plus add/delete for writers."""

    filters_pushdown = True

    def __init__(self, config: MilvusConfig, model_id: str, dim: int, num_frames: int) -> None:
        self.config, self.model_id, self.dim, self.num_frames = config, model_id, dim, num_frames
        self.name = collection_name(config.prefix, model_id)
        self._client: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._size = (0, 0.0)  # (count, monotonic time it was read)

    # --- lifecycle --------------------------------------------------------------------------------------
    def open(self, *, create: bool = True) -> MilvusIndex:
        with self._lock:
            if self._client is None:
                self._client = connect(self.config)
        if create:
            self._call(self._ensure_collection)
        return self

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as e:  # closing a dead connection is not worth failing a shutdown
                logger.debug("closing the Milvus client: %s", e)

    def __enter__(self) -> MilvusIndex:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_collection(self, client: Any) -> None:
        if client.has_collection(self.name, timeout=self.config.timeout_s):
            return
        from pymilvus import DataType

        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(PK, DataType.INT64, is_primary=True)
        schema.add_field(VIDEO, DataType.INT64)
        schema.add_field(START, DataType.FLOAT)
        schema.add_field(END, DataType.FLOAT)
        schema.add_field(CREATED, DataType.INT64)  # microseconds since the epoch, UTC
        schema.add_field(DURATION, DataType.FLOAT)  # the video's duration (-1: unknown), for filters
        schema.add_field(CLS, DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field(TOKENS, DataType.FLOAT16_VECTOR, dim=self.num_frames * self.dim)
        params = client.prepare_index_params()
        params.add_index(
            field_name=CLS,
            index_type=self.config.index_type,
            metric_type="IP",
            params=dict(self.config.index_params),
        )
        # Milvus loads a collection only when every vector field has an index; the tokens are never searched.
        params.add_index(field_name=TOKENS, index_type="FLAT", metric_type="IP", params={})
        # Strong: a worker's insert is acknowledged before the catalog commit, and the API replica that
        # serves the next search is another client, so "Session" would not promise it sees the insert.
        client.create_collection(
            self.name,
            schema=schema,
            index_params=params,
            consistency_level="Strong",
            timeout=self.config.timeout_s,
        )
        logger.info("created Milvus collection %s for model %s", self.name, self.model_id)

    @property
    def alias(self) -> str:
        """`<prefix>_active`: the collection of the catalog's active model, for readers outside the service."""
        return f"{re.sub(r'[^A-Za-z0-9_]', '_', self.config.prefix)}_active"

    def point_alias(self) -> bool:
        """Point the alias at this collection (after a reindex switched the active model to it); False where
        the server has no aliases (Milvus Lite 2.5). The service never reads through the alias: it opens
        the active model's collection by name, so the catalog's switch is the one that counts."""

        def switch(client: Any) -> bool:
            try:
                client.describe_alias(self.alias, timeout=self.config.timeout_s)
                exists = True
            except Exception as e:
                if "UNIMPLEMENTED" in str(e):
                    return False
                exists = False
            if exists:
                client.alter_alias(self.name, self.alias, timeout=self.config.timeout_s)
            else:
                client.create_alias(self.name, self.alias, timeout=self.config.timeout_s)
            return True

        done = bool(self._call(switch))
        if not done:
            logger.warning(
                "Milvus at %s has no collection aliases; %s is not aliased", self.config.uri, self.name
            )
        return done

    def aliased(self) -> str | None:
        """The collection the alias points at, or None."""

        def describe(client: Any) -> str | None:
            try:
                return str(
                    client.describe_alias(self.alias, timeout=self.config.timeout_s)["collection_name"]
                )
            except Exception:
                return None

        return self._call(describe)  # type: ignore[no-any-return]

    def drop(self) -> None:
        """Drop the collection (rebuild starts from nothing)."""
        self._call(lambda c: c.drop_collection(self.name, timeout=self.config.timeout_s))
        self._cache.clear()

    def _call(self, fn: Any) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = connect(self.config)
        try:
            return fn(self._client)
        except MilvusUnavailableError:
            raise
        except Exception as e:
            raise MilvusUnavailableError(
                f"Milvus at {self.config.uri} failed on collection {self.name}: {e}"
            ) from e

    # --- writes -----------------------------------------------------------------------------------------
    def add(self, rows: Sequence[SegmentRow], cls: np.ndarray, tokens: np.ndarray) -> None:
        """Upsert segments: CLS [N, D] (normalised here) and frame tokens [N, T, D] fp16."""
        if not rows:
            return
        vecs = np.asarray(cls, np.float32).reshape(len(rows), self.dim)
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        flat = np.asarray(tokens, np.float16).reshape(len(rows), self.num_frames * self.dim)
        data = [
            {
                PK: int(r.id),
                VIDEO: int(r.video_id),
                START: float(r.start_s),
                END: float(r.end_s),
                CREATED: _micros(r.created_at),
                DURATION: float(r.duration_s) if r.duration_s is not None else -1.0,
                CLS: vecs[n],
                TOKENS: flat[n],
            }
            for n, r in enumerate(rows)
        ]
        self._call(lambda c: c.upsert(self.name, data, timeout=self.config.timeout_s))
        self._size = (0, 0.0)

    def delete(self, ids: Iterable[int]) -> None:
        ids = [int(i) for i in ids]
        if ids:
            self._call(lambda c: c.delete(self.name, ids=ids, timeout=self.config.timeout_s))
            self._size = (0, 0.0)

    # --- what /health and /metrics describe ---------------------------------------------------------------
    @property
    def factory(self) -> str:
        return f"milvus:{self.config.index_type}"

    @property
    def device(self) -> str:
        return "milvus"

    device_reason = ""
    rerank = 0

    def search_settings(self) -> dict[str, int | None]:
        params = self.config.search_params
        return {"nprobe": params.get("nprobe"), "ef_search": params.get("ef"), "rerank": 0}

    # --- reads ------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Rows in the collection; a non-zero count is reused for a moment (every search batch asks)."""
        now = time.monotonic()
        if self._size[0] and now - self._size[1] < _SIZE_TTL_S:
            return self._size[0]
        rows = self._call(
            lambda c: c.query(self.name, filter="", output_fields=["count(*)"], timeout=self.config.timeout_s)
        )
        self._size = (int(rows[0]["count(*)"]) if rows else 0, now)
        return self._size[0]

    def ids(self) -> np.ndarray:
        """Every segment id in the collection (for verify)."""
        out: list[int] = []

        def scan(c: Any) -> None:
            it = c.query_iterator(self.name, batch_size=4096, filter=f"{PK} >= 0", output_fields=[PK])
            try:
                while batch := it.next():
                    out.extend(int(r[PK]) for r in batch)
            finally:
                it.close()

        self._call(scan)
        return np.array(sorted(out), np.int64)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        filters: Sequence[SegmentFilterLike | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(cosine scores [B, k], segment ids [B, k]); empty slots are (-inf, -1).

        Queries that share a filter expression go to Milvus in one call, with the filter pushed down.
        """
        q = np.array(queries, dtype=np.float32, ndmin=2)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        if k <= 0 or not len(q):
            return out_s, out_i
        groups: dict[str, list[int]] = {}
        for r in range(len(q)):
            groups.setdefault(filter_expression(filters[r] if filters else None), []).append(r)
        for expr, rows in groups.items():
            hits = self._call(
                lambda c, expr=expr, rows=rows: c.search(
                    self.name,
                    data=[q[r].tolist() for r in rows],
                    anns_field=CLS,
                    limit=min(k, 16384),
                    filter=expr,
                    search_params={"metric_type": "IP", "params": dict(self.config.search_params)},
                    timeout=self.config.timeout_s,
                )
            )
            for r, row_hits in zip(rows, hits, strict=True):
                for n, h in enumerate(row_hits):
                    out_s[r, n], out_i[r, n] = float(h["distance"]), int(h["id"])
        return out_s, out_i

    def tokens(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Frame tokens [N, T, D] fp16; raises MissingRecordError for ids the collection does not hold."""
        ids = [int(i) for i in np.asarray(ids, np.int64).ravel()]
        want = sorted({i for i in ids if i not in self._cache})
        got: dict[int, np.ndarray] = {}
        for start in range(0, len(want), _GET_CHUNK):
            chunk = want[start : start + _GET_CHUNK]
            rows = self._call(
                lambda c, chunk=chunk: c.get(
                    self.name, ids=chunk, output_fields=[TOKENS], timeout=self.config.timeout_s
                )
            )
            for row in rows:
                got[int(row[PK])] = _fp16(row[TOKENS]).reshape(self.num_frames, self.dim)
        for i, t in got.items():
            self._cache[i] = t
        missing = [i for i in ids if i not in self._cache]
        out = np.stack([self._cache[i] for i in ids if i in self._cache]) if len(missing) < len(ids) else None
        while len(self._cache) > _TOKEN_CACHE:
            self._cache.popitem(last=False)
        if missing:
            raise MissingRecordError(missing)
        if out is None:
            return np.zeros((0, self.num_frames, self.dim), np.float16)
        return out


def _fp16(value: Any) -> np.ndarray:
    # pymilvus returns a FLOAT16_VECTOR as bytes, or a list holding one bytes object.
    if isinstance(value, list | tuple) and value and isinstance(value[0], bytes | bytearray):
        value = b"".join(value)
    if isinstance(value, bytes | bytearray):
        return np.frombuffer(value, np.float16)
    return np.asarray(value, np.float16)
