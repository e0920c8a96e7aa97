"""Milvus as the broad view and token store: one name per model id, rows keyed by the catalog's segment id.

The catalog stays the source of truth; a collection is a cache that `indexer rebuild-index --backend milvus`
re-creates from the token store, as a new generation beside the live one (indexer.milvus_generations:
the model's name is an alias, or a recorded pointer where the server has no aliases). Writers insert here
*before* committing the catalog rows, and the searcher drops every hit the catalog does not have as a live
segment, so a crash in between leaves nothing searchable (`indexer verify --repair` removes the stray rows).

A search brings its hits' tokens in the same call where the server can (probed on the first search);
Milvus Lite 2.5.1 cannot, and there `tokens()` reads them with one `get` per 256 ids.

About 590 lines: one backend class (generations, writes to one or two generations, search, tokens)
behind the searcher's seam, whose client, generation cache, token cache and probes are one piece of state.
Apart: the field layout, names, filter expressions and connection (milvus_schema.py), the catalog
comparison and rebuild (milvus_sync.py), the alias/pointer logic (milvus_generations.py) and the rebuild
lease (milvus_rebuild_lease.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from indexer.milvus_generations import Generations, NextRecord, not_found
from indexer.milvus_schema import (
    CLS,
    CREATED,
    DURATION,
    END,
    PK,
    START,
    TOKENS,
    VIDEO,
    MilvusConfig,
    MilvusUnavailableError,
    SegmentFilterLike,
    SegmentRow,
    collection_name,
    connect,
    filter_expression,
    micros,
    milvus_safe,
)
from indexer.token_store import MissingRecordError

logger = logging.getLogger(__name__)

_TOKEN_CACHE = 4096  # tokens of recent hits, by id (ids are never reused, so an entry never goes stale)
_GET_CHUNK = 256
_SIZE_TTL_S = 1.0
POINTER_TTL_S = 1.0  # how long a reader trusts a generation pointer it read (servers without aliases)


class MilvusIndex:
    """The `app.searcher.SegmentIndex` seam over one model's Milvus name, plus add/delete for writers.

    The name (`collection_name`) stands for the model's current generation (indexer.milvus_generations):
    an alias where the server has aliases, else a pointer looked up here. Writes and reads go through it;
    `new_generation`/`switch_to` let a rebuild fill a generation beside it and then move the name.
    """

    filters_pushdown = True

    def __init__(self, config: MilvusConfig, model_id: str, dim: int, num_frames: int) -> None:
        self.config, self.model_id, self.dim, self.num_frames = config, model_id, dim, num_frames
        self.name = collection_name(config.prefix, model_id)
        self.generations = Generations(milvus_safe(config.prefix), config.timeout_s)
        self._client: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._size = (0, 0.0)  # (count, monotonic time it was read)
        self._pointer: tuple[str, float] | None = None  # (current collection, monotonic time read)
        self._next: tuple[str | None, float] | None = None  # (generation a rebuild fills, time read)
        # Whether a search can return the hits' tokens (None: not tried yet; the first search tries).
        self.tokens_in_search: bool | None = None

    # --- lifecycle --------------------------------------------------------------------------------------
    def open(self, *, create: bool = True) -> MilvusIndex:
        with self._lock:
            if self._client is None:
                self._client = connect(self.config)
        self._call(self.generations.probe)
        if create:
            self._call(self._ensure_generation)
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

    def _ensure_generation(self, client: Any) -> None:
        gens = self.generations
        current = gens.current(client, self.name) or gens.adopt_legacy(client, self.name)
        if current is not None and client.has_collection(current, timeout=self.config.timeout_s):
            return
        first = current or f"{self.name}_g1"
        self._create(client, first)
        gens.point(client, self.name, first)

    def _create(self, client: Any, name: str) -> None:
        if client.has_collection(name, timeout=self.config.timeout_s):
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
            name,
            schema=schema,
            index_params=params,
            consistency_level="Strong",
            timeout=self.config.timeout_s,
        )
        logger.info("created Milvus collection %s for model %s", name, self.model_id)

    # --- generations ------------------------------------------------------------------------------------
    @property
    def collection(self) -> str | None:
        """The generation the model's name stands for now (None: not created yet)."""
        return self._call(lambda c: self.generations.current(c, self.name))  # type: ignore[no-any-return]

    def new_generation(self) -> str:
        """Create an empty generation beside the current one (searches keep reading the current); its name."""

        def create(client: Any) -> str:
            name = self.generations.next_generation(client, self.name)
            self._create(client, name)
            return name

        return self._call(create)  # type: ignore[no-any-return]

    def switch_to(self, collection: str) -> list[str]:
        """Point the model's name (and `<prefix>_active`, where it stood for the old generation) at
        `collection`, then drop every other generation; the ones dropped."""

        def switch(client: Any) -> list[str]:
            gens = self.generations
            old = gens.current(client, self.name)
            gens.point(client, self.name, collection)
            if old is not None and gens.current(client, self.alias) == old:
                gens.point(client, self.alias, collection)
            dropped = [g for g in gens.generations(client, self.name) if g != collection]
            for g in dropped:
                client.drop_collection(g, timeout=self.config.timeout_s)
            return dropped

        dropped = self._call(switch)
        self._pointer, self._size = None, (0, 0.0)
        logger.info("Milvus name %s now stands for %s (dropped %s)", self.name, collection, dropped or "none")
        return dropped  # type: ignore[no-any-return]

    def drop_generation(self, collection: str) -> None:
        """Drop one generation that the name does not stand for (a rebuild's, left unfinished)."""

        def drop(client: Any) -> None:
            if collection == self.generations.current(client, self.name):
                raise ValueError(f"{collection} is the current generation of {self.name}")
            client.drop_collection(collection, timeout=self.config.timeout_s)

        self._call(drop)

    @property
    def alias(self) -> str:
        """`<prefix>_active`: the generation of the catalog's active model, for readers outside the service."""
        return f"{milvus_safe(self.config.prefix)}_active"

    def point_alias(self) -> str:
        """Point `<prefix>_active` at this model's current generation (after a reindex switched the active
        model to it) and return that generation. An alias where the server has aliases, else the recorded
        pointer. The service never reads through it: it opens the active model's name."""

        def point(client: Any) -> str:
            current = self.generations.current(client, self.name)
            if current is None:
                raise MilvusUnavailableError(f"Milvus name {self.name} stands for no collection yet")
            self.generations.point(client, self.alias, current)
            return current

        return self._call(point)  # type: ignore[no-any-return]

    def aliased(self) -> str | None:
        """The collection `<prefix>_active` stands for, or None."""
        return self._call(lambda c: self.generations.current(c, self.alias))  # type: ignore[no-any-return]

    def drop(self) -> None:
        """Drop the model: its name (and `<prefix>_active` where it stood for it) and every generation."""

        def drop(client: Any) -> None:
            gens = self.generations
            current = gens.current(client, self.name)
            if current is not None and gens.current(client, self.alias) == current:
                gens.forget(client, self.alias)
            gens.forget(client, self.name)
            gens.clear_next(client, self.name)
            for g in gens.generations(client, self.name):
                client.drop_collection(g, timeout=self.config.timeout_s)

        self._call(drop)
        self._pointer, self._next, self._size = None, None, (0, 0.0)
        with self._cache_lock:
            self._cache.clear()

    def _target(self, client: Any) -> str:
        """The name a data call uses: the alias itself (the server resolves it), or the pointer's
        collection, re-read once it is a second old."""
        return self.name if self.generations.probe(client) else self._current(client)[0]

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

    def _on(self, fn: Any, collection: str | None = None) -> Any:
        """fn(client, collection) on `collection`, else on the model's current generation; a pointer that
        named a generation dropped since it was read is read again, once."""

        def run(client: Any) -> Any:
            if collection is not None:
                return fn(client, collection)
            try:
                return fn(client, self._target(client))
            except Exception as e:
                if self.generations.aliases or not not_found(e):
                    raise
                self._pointer = None
                return fn(client, self._target(client))

        return self._call(run)

    # --- writes -----------------------------------------------------------------------------------------
    # While `indexer rebuild-index` fills a generation (the next record, milvus_generations.NextRecord),
    # every write goes to the current generation AND to that one. A writer that read "no rebuild" just
    # before one began wrote the current generation only: `complete_add`, after the catalog commit, reads
    # the next record afresh and copies the rows into whatever generation lacks them. A rebuild copies in
    # what was committed before it looked, so between the two nothing committed is missed.
    def add(
        self,
        rows: Sequence[SegmentRow],
        cls: np.ndarray,
        tokens: np.ndarray,
        *,
        collection: str | None = None,
    ) -> frozenset[str]:
        """Upsert segments: CLS [N, D] (normalised here) and frame tokens [N, T, D] fp16; into the current
        generation (and the one a rebuild fills, if any), or only into `collection`. Returns the
        collections written, for `complete_add`."""
        if not rows:
            return frozenset()
        data = self._data(rows, cls, tokens)
        written = self._write(lambda c, name: c.upsert(name, data, timeout=self.config.timeout_s), collection)
        self._size = (0, 0.0)
        return written

    def complete_add(
        self, rows: Sequence[SegmentRow], cls: np.ndarray, tokens: np.ndarray, written: frozenset[str]
    ) -> frozenset[str]:
        """After the catalog commit of rows `add` wrote to `written`: upsert them into the current generation
        and the one a rebuild fills (both read afresh) where they are not yet; the collections added."""
        if not rows:
            return frozenset()

        def run(client: Any) -> frozenset[str]:
            self._pointer = None
            _, current = self._current(client)
            upcoming = self._upcoming(client, fresh=True)
            want = {current} | ({upcoming} if upcoming else set())
            added = set()
            for name in sorted(want - written):
                try:
                    client.upsert(name, data, timeout=self.config.timeout_s)
                    added.add(name)
                except Exception as e:
                    if not not_found(e):
                        raise
            return frozenset(added)

        data = self._data(rows, cls, tokens)
        added = self._call(run)
        if added:
            logger.info("rows %s..%s also written to %s after commit", rows[0].id, rows[-1].id, sorted(added))
        return added  # type: ignore[no-any-return]

    def delete(self, ids: Iterable[int], *, collection: str | None = None) -> None:
        """Delete rows from the current generation and the one a rebuild fills (read afresh: a delete
        follows its catalog commit), or only from `collection`."""
        ids = [int(i) for i in ids]
        if ids:
            self._write(
                lambda c, name: c.delete(name, ids=ids, timeout=self.config.timeout_s), collection, True
            )
            self._size = (0, 0.0)

    def _data(self, rows: Sequence[SegmentRow], cls: np.ndarray, tokens: np.ndarray) -> list[dict[str, Any]]:
        vecs = np.asarray(cls, np.float32).reshape(len(rows), self.dim)
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        flat = np.asarray(tokens, np.float16).reshape(len(rows), self.num_frames * self.dim)
        return [
            {
                PK: int(r.id),
                VIDEO: int(r.video_id),
                START: float(r.start_s),
                END: float(r.end_s),
                CREATED: micros(r.created_at),
                DURATION: float(r.duration_s) if r.duration_s is not None else -1.0,
                CLS: vecs[n],
                TOKENS: flat[n],
            }
            for n, r in enumerate(rows)
        ]

    def _write(self, fn: Any, collection: str | None, fresh: bool = False) -> frozenset[str]:
        """fn(client, name) on `collection`, else on the current generation and the one being filled; the
        collections it reached (the current one as last resolved: on a server the alias decides)."""
        if collection is not None:
            self._on(fn, collection)
            return frozenset({collection})

        def run(client: Any) -> frozenset[str]:
            call, current = self._current(client)
            try:
                fn(client, call)
            except Exception as e:
                if self.generations.aliases or not not_found(e):
                    raise
                self._pointer = None  # named a generation a rebuild has dropped since
                call, current = self._current(client)
                fn(client, call)
            written = {current}
            upcoming = self._upcoming(client, fresh)
            if upcoming is not None and upcoming not in written:
                try:
                    fn(client, upcoming)
                    written.add(upcoming)
                except Exception as e:
                    if not not_found(e):
                        raise
                    self._next = None  # the rebuild gave up (or finished) and dropped it
            return frozenset(written)

        return self._call(run)  # type: ignore[no-any-return]

    def _current(self, client: Any) -> tuple[str, str]:
        """(the name a write uses, the collection it stands for as last read: at most POINTER_TTL_S old)."""
        now = time.monotonic()
        if self._pointer is None or now - self._pointer[1] >= POINTER_TTL_S:
            current = self.generations.current(client, self.name)
            if current is None:
                return self.name, self.name  # nothing recorded: the call fails with the server's "not found"
            self._pointer = (current, now)
        return (self.name if self.generations.aliases else self._pointer[0]), self._pointer[0]

    def _upcoming(self, client: Any, fresh: bool) -> str | None:
        """The generation a rebuild is filling (read afresh, or at most POINTER_TTL_S old), or None."""
        now = time.monotonic()
        if fresh or self._next is None or now - self._next[1] >= POINTER_TTL_S:
            record = self.generations.read_next(client, self.name)
            self._next = ((record.collection if record else "") or None, now)
        return self._next[0]

    def next_record(self) -> NextRecord | None:
        """The rebuild in progress on this model's name (milvus_rebuild_lease), or None."""
        return self._call(lambda c: self.generations.read_next(c, self.name))  # type: ignore[no-any-return]

    def write_next_record(self, record: NextRecord | None) -> None:
        """Record (None: clear) the rebuild in progress; writers see it within POINTER_TTL_S."""
        if record is None:
            self._call(lambda c: self.generations.clear_next(c, self.name))
        else:
            self._call(lambda c: self.generations.write_next(c, self.name, record))
        self._next = None

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
        """Rows in the current generation; a non-zero count is reused for a moment (every search batch asks)."""
        now = time.monotonic()
        if self._size[0] and now - self._size[1] < _SIZE_TTL_S:
            return self._size[0]
        rows = self._on(
            lambda c, name: c.query(
                name, filter="", output_fields=["count(*)"], timeout=self.config.timeout_s
            )
        )
        self._size = (int(rows[0]["count(*)"]) if rows else 0, now)
        return self._size[0]

    def ids(self, *, collection: str | None = None) -> np.ndarray:
        """Every segment id in the current generation, or in `collection` (for verify and rebuild)."""

        def scan(c: Any, name: str) -> list[int]:
            out: list[int] = []
            it = c.query_iterator(name, batch_size=4096, filter=f"{PK} >= 0", output_fields=[PK])
            try:
                while batch := it.next():
                    out.extend(int(r[PK]) for r in batch)
            finally:
                it.close()
            return out

        return np.array(sorted(self._on(scan, collection)), np.int64)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        filters: Sequence[SegmentFilterLike | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(cosine scores [B, k], segment ids [B, k]); empty slots are (-inf, -1).

        Queries that share a filter expression go to Milvus in one call, with the filter pushed down. Where
        the server returns FLOAT16_VECTOR fields with hits (`tokens_in_search`), the same call brings the
        hits' tokens, kept for the `tokens()` call that follows; the first search finds out.
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
            hits = self._search(q[rows], min(k, 16384), expr)
            for r, row_hits in zip(rows, hits, strict=True):
                for n, h in enumerate(row_hits):
                    out_s[r, n], out_i[r, n] = float(h["distance"]), int(h["id"])
        return out_s, out_i

    def _search(self, q: np.ndarray, limit: int, expr: str) -> Any:
        # Tokens ride along only while the cache can hold them all (else tokens() would fetch them again).
        with_tokens = self.tokens_in_search is not False and len(q) * limit <= _TOKEN_CACHE
        # While untried, fail at once rather than retry for the whole timeout: Milvus Lite 2.5.1 answers
        # "Unexpected error in RPC handling" to a search for more than one hit with its tokens.
        probing = {"timeout": None, "retry_times": 0} if self.tokens_in_search is None else {}

        def call(c: Any, name: str, fields: list[str], **kw: Any) -> Any:
            return c.search(
                name,
                data=q.tolist(),
                anns_field=CLS,
                limit=limit,
                filter=expr,
                output_fields=fields,
                search_params={"metric_type": "IP", "params": dict(self.config.search_params)},
                **{"timeout": self.config.timeout_s, **kw},
            )

        if not with_tokens:
            return self._on(lambda c, name: call(c, name, []))
        try:
            hits = self._on(lambda c, name: call(c, name, [TOKENS], **probing))
        except MilvusUnavailableError:
            if self.tokens_in_search:
                raise
            hits = self._on(lambda c, name: call(c, name, []))  # unavailable after all: this raises too
            self._learn_tokens_in_search(False, "a search with the tokens as an output field failed")
            return hits
        got = {}
        for h in (h for row in hits for h in row):
            value = (h.get("entity") or {}).get(TOKENS)
            t = _fp16(value) if value is not None else None
            if t is None or t.size != self.num_frames * self.dim:
                # Milvus Lite 2.5.1 can return the first hit's tokens and None for the rest.
                self._learn_tokens_in_search(False, "a hit came back without its tokens")
                return hits
            got[int(h["id"])] = t.reshape(self.num_frames, self.dim)
        if len(got) > 1:  # one hit proves nothing: Milvus Lite 2.5.1 returns the tokens of a single hit
            self._learn_tokens_in_search(True, "")
        if self.tokens_in_search:
            self._remember(got)
        return hits

    def _learn_tokens_in_search(self, works: bool, why: str) -> None:
        if self.tokens_in_search is None:
            self.tokens_in_search = works
            if not works:
                logger.info("Milvus at %s: %s; tokens are read with a second call", self.config.uri, why)

    def _remember(self, got: dict[int, np.ndarray]) -> None:
        with self._cache_lock:
            for i, t in got.items():
                self._cache[i] = t
                self._cache.move_to_end(i)
            while len(self._cache) > _TOKEN_CACHE:
                self._cache.popitem(last=False)

    def tokens(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Frame tokens [N, T, D] fp16; raises MissingRecordError for ids the collection does not hold.

        Tokens that came with the search are served from memory; the rest cost one `get` per 256 ids.
        """
        ids = [int(i) for i in np.asarray(ids, np.int64).ravel()]
        with self._cache_lock:
            have = {i: self._cache[i] for i in ids if i in self._cache}
        want = sorted({i for i in ids if i not in have})
        got: dict[int, np.ndarray] = {}
        for start in range(0, len(want), _GET_CHUNK):
            chunk = want[start : start + _GET_CHUNK]
            rows = self._on(
                lambda c, name, chunk=chunk: c.get(
                    name, ids=chunk, output_fields=[TOKENS], timeout=self.config.timeout_s
                )
            )
            for row in rows:
                got[int(row[PK])] = _fp16(row[TOKENS]).reshape(self.num_frames, self.dim)
        self._remember(got)
        have.update(got)
        missing = [i for i in ids if i not in have]
        if missing:
            raise MissingRecordError(missing)
        if not ids:
            return np.zeros((0, self.num_frames, self.dim), np.float16)
        return np.stack([have[i] for i in ids])


def _fp16(value: Any) -> np.ndarray:
    # pymilvus returns a FLOAT16_VECTOR as bytes, or a list holding one bytes object.
    if isinstance(value, list | tuple) and value and isinstance(value[0], bytes | bytearray):
        value = b"".join(value)
    if isinstance(value, bytes | bytearray):
        return np.frombuffer(value, np.float16)
    return np.asarray(value, np.float16)
