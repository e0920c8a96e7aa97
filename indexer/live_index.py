"""The in-memory index an API process searches: a verified snapshot, caught up and kept current by the change feed.

A little over 400 lines: one class, whose load, rebuild, follow and snapshot steps share one lock and one
position in the feed; the FAISS wrapper (vector_index.py) and the feed (changes.py) are apart.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog
from indexer.catalog import IndexMismatchError
from indexer.changes import ChangeFollower, FeedLag, latest_seq
from indexer.db import session_scope
from indexer.errors import IndexerError, UserError
from indexer.feed_compaction import DEFAULT_RETENTION_S, prune_model
from indexer.index_build import build_index_from
from indexer.index_device import resolve_index_device
from indexer.paths import DataDir
from indexer.snapshot import CorruptSnapshotError, SnapshotNotFoundError
from indexer.token_store import TokenStore
from indexer.vector_index import DuplicateIdError, TrainingError, VectorIndex

logger = logging.getLogger(__name__)

_READ_CHUNK = 4096
# Candidates an approximate index returns for exact re-scoring from the stored CLS vectors when `rerank`
# is not set. At 1M segments `IVF4096,PQ64np` found 0.99 of the exact top-10 with 100 and 0.92 with 50
# (docs/BENCHMARKS.md, "Library scale"); 5M needed 300 there, set per library with --index-rerank.
DEFAULT_RERANK = 100


class IndexConfigError(IndexerError, UserError, ValueError):
    """The index settings do not fit together (a knob for another index type, a malformed factory)."""


def read_cls(store: TokenStore, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids that have a valid record, their CLS as float32), reading in bounded chunks."""
    arr = np.asarray(ids, dtype=np.int64)
    kept, vecs = [], []
    for start in range(0, len(arr), _READ_CHUNK):
        chunk = arr[start : start + _READ_CHUNK]
        valid, cls = store.get_cls_checked(chunk)  # one read and checksum a record, not has() then get()
        if valid.any():
            kept.append(chunk[valid])
            vecs.append(cls[valid].astype(np.float32))
    if not kept:
        return np.zeros(0, np.int64), np.zeros((0, store.dim), np.float32)
    return np.concatenate(kept), np.concatenate(vecs)


class LiveIndex:
    """FAISS over one model's segment CLS vectors, plus its token store, following the catalog's change feed.

    Adds and deletes committed by any process (workers, other API replicas) are applied within about
    `follow_interval_s`. The snapshot on disk is a cache: missing, corrupt or for another model, it is
    rebuilt from the catalog's segment ids and the token store.
    """

    def __init__(
        self,
        data: DataDir,
        session_factory: sessionmaker[Session],
        model_id: str,
        dim: int,
        num_frames: int,
        factory: str = "Flat",
        follow_interval_s: float = 0.25,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        rerank: int | None = None,
        device: str = "cpu",
        catch_up_s: float | None = None,
        feed_retention_s: float = DEFAULT_RETENTION_S,
    ) -> None:
        self.data, self._factory, self.model_id = data, session_factory, model_id
        self.dim, self.num_frames, self._wanted_factory = dim, num_frames, factory
        self.follow_interval_s = follow_interval_s
        # open() replays the feed for at most this long (None: to the end); the follower thread does the rest.
        self._catch_up_s = catch_up_s
        self._feed_retention_s = feed_retention_s
        try:  # a knob for another index type fails here, at start-up, not at the first search
            VectorIndex(dim, factory, nprobe=nprobe, ef_search=ef_search)
        except ValueError as e:
            raise IndexConfigError(f"index settings: {e}") from e
        if rerank is not None and rerank < 0:
            raise IndexConfigError(f"index settings: rerank must be >= 0 (0: off), got {rerank}")
        self._nprobe, self._ef_search, self._rerank = nprobe, ef_search, rerank
        self.placement = resolve_index_device(device)  # IndexDeviceError for an unusable GPU
        self.device_reason = self.placement.reason  # why the index is on the CPU ("" on a GPU)
        self.path = data.index_path(model_id)
        self._index = VectorIndex(dim, "Flat")
        self._store: TokenStore | None = None
        self._follower: ChangeFollower | None = None
        self._start_seq = 0
        self._following = False
        self._lock = threading.RLock()  # applying changes vs. taking a snapshot
        self.rebuilt = False  # open() found no usable snapshot and built the index from the token store

    # --- lifecycle ----------------------------------------------------------------------------------
    def open(self, *, follow: bool = True, rebuild: bool = False, check_active: bool = True) -> LiveIndex:
        """Load (or rebuild) the index, catch up with the change feed, then follow it in a thread."""
        if check_active:
            self.check_model()
        self._store = TokenStore(
            self.data.tokens_dir(self.model_id), self.num_frames, self.dim, readonly=True
        )
        damaged = self._store.damaged_shards()
        if damaged:
            # The snapshot would serve segments whose tokens are gone: rebuild from the records still valid.
            logger.warning(
                "token store damaged (%s); rebuilding the index from the valid records; "
                "`indexer verify --repair` re-encodes the rest",
                "; ".join(damaged),
            )
        self.rebuilt = bool(rebuild or damaged or not self._load())
        if self.rebuilt:
            self._rebuild()
        self._following = follow
        self._follow()
        if self.placement.gpu is None:
            logger.info("the FAISS index is on the CPU: %s", self.placement.reason)
        logger.info(
            "index for %s open: %d segments (%s on %s, %s)",
            self.model_id,
            self.size,
            self.factory,
            self.device,
            self.search_settings(),
        )
        return self

    def _follow(self) -> None:
        self._follower = ChangeFollower(
            self._factory,
            self.model_id,
            self._apply_add,
            self._apply_delete,
            self._start_seq,
            self.follow_interval_s,
            reload=self._reload_below_horizon,
        )
        deadline = time.monotonic() + (self._catch_up_s if self._catch_up_s is not None else float("inf"))
        self._follower.poll()
        while self._follower.lag.rows and time.monotonic() < deadline:
            self._follower.poll()
        if self._following:
            self._follower.start()

    def close(self) -> None:
        if self._follower is not None:
            self._follower.stop()
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> LiveIndex:
        return self.open() if self._store is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_model(self) -> None:
        """Raise IndexMismatchError unless this model is (or may become) the catalog's active one."""
        with session_scope(self._factory) as session:
            active = catalog.get_active_model(session)
            mine = catalog.get_model(session, self.model_id)
        if active is not None and active.id != self.model_id:
            raise IndexMismatchError(
                f"the catalog's active model is {active.id!r}, but this process loaded {self.model_id!r}; "
                f"load {active.id!r}, or switch the library to this model with "
                "`indexer reindex --model <this model>`"
            )
        if mine is not None and (mine.dim, mine.num_frames) != (self.dim, self.num_frames):
            raise IndexMismatchError(
                f"model {self.model_id!r} is registered with dim={mine.dim}, T={mine.num_frames}, not "
                f"dim={self.dim}, T={self.num_frames}; a changed checkpoint needs a new model id"
            )

    def _load(self) -> bool:
        try:
            index, manifest = VectorIndex.load(self.path)
        except SnapshotNotFoundError:
            logger.info("no index snapshot for %s yet; building it from the token store", self.model_id)
            return False
        except CorruptSnapshotError as e:
            logger.warning("index snapshot unusable (%s); rebuilding from the token store", e)
            return False
        found = (manifest.get("model_id"), index.dim, index.factory)
        if found != (self.model_id, self.dim, self._wanted_factory) or "last_seq" not in manifest:
            logger.warning(
                "index snapshot %s is for (model, dim, factory) = %s, not %s; rebuilding",
                self.path,
                found,
                (self.model_id, self.dim, self._wanted_factory),
            )
            return False
        if self._rerank is None and manifest.get("rerank") is not None:
            self._rerank = int(manifest["rerank"])  # as `indexer rebuild-index --index-rerank` left it
        self._index, self._start_seq = self._place(index), int(manifest["last_seq"])
        return True

    def rebuild(self) -> None:
        """Replace the index with one built from the catalog's segment ids and the token store."""
        assert self._store is not None, "open() first"
        if self._follower is not None:
            self._follower.stop()
        self._rebuild()
        self._follow()

    def _rebuild(self) -> None:
        assert self._store is not None
        with self._lock:
            with session_scope(self._factory) as session:
                # The seq first: changes after it are replayed on top, and replaying is idempotent.
                seq = latest_seq(session)
                ids = catalog.segment_ids_for_model(session, self.model_id)
            index = self._build(np.asarray(ids, dtype=np.int64))
            if index.ntotal < len(ids):
                logger.warning(
                    "%d segments of %s have no valid token record and are left out; "
                    "run `indexer verify --repair`",
                    len(ids) - index.ntotal,
                    self.model_id,
                )
            self._index, self._start_seq = index, seq

    def _reload_below_horizon(self, horizon: int) -> int:
        """The feed was pruned past this index's position: take the snapshot on disk when it covers
        `horizon`, else rebuild from the catalog; returns the seq to follow on from."""
        with self._lock:
            if not (self._load() and self._start_seq >= horizon):
                self._rebuild()
                self.rebuilt = True
            return self._start_seq

    def _build(self, ids: np.ndarray) -> VectorIndex:
        """An index over those of ``ids`` the token store holds: trained on a sample, filled in chunks."""
        assert self._store is not None
        if not len(ids):
            try:
                return self._place(VectorIndex(self.dim, self._wanted_factory))
            except ValueError:
                return self._place(VectorIndex(self.dim, "Flat"))
        store = self._store

        def read(chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return read_cls(store, chunk)

        try:
            return self._place(build_index_from(self.dim, self._wanted_factory, ids, read))
        except TrainingError as e:
            logger.warning("%s; using an exact Flat index until the library is larger", e)
            return self._place(build_index_from(self.dim, "Flat", ids, read))

    def _place(self, index: VectorIndex) -> VectorIndex:
        """Apply the search knobs (to the factory they were given for) and move the index to its device."""
        if index.factory == self._wanted_factory:
            index.set_search_params(nprobe=self._nprobe, ef_search=self._ef_search)
        gpu = self.placement.gpu
        if gpu is not None and not index.to_gpu(gpu) and index.cpu_reason != self.device_reason:
            self.device_reason = index.cpu_reason
            logger.warning("the FAISS index stays on the CPU: %s", index.cpu_reason)
        elif index.device != "cpu":
            self.device_reason = ""
        return index

    # --- following ----------------------------------------------------------------------------------
    def _apply_add(self, ids: list[int]) -> None:
        assert self._store is not None
        with self._lock:
            arr = np.asarray(ids, dtype=np.int64)
            new = arr[~self._index.contains(arr)]
            kept, vecs = read_cls(self._store, new)
            if len(kept) < len(new):
                # Tokens are durable before their rows commit, so this is a freed (deleted) or damaged record.
                logger.warning(
                    "%d added segments of %s have no token record; skipped",
                    len(new) - len(kept),
                    self.model_id,
                )
            try:
                self._index.add(kept, vecs)
            except DuplicateIdError:  # a replayed add of an id an HNSW index still holds as a tombstone
                for i, v in zip(kept, vecs, strict=True):
                    try:
                        self._index.add([i], v[None])
                    except DuplicateIdError:
                        pass
            except TrainingError:  # enough segments now to train the factory asked for: build it
                self._index = self._build(np.union1d(self._index.ids(), kept))

    def _apply_delete(self, ids: list[int]) -> None:
        with self._lock:
            self._index.remove(ids)

    def refresh(self) -> int:
        """Apply what the change feed holds now (the follower thread does this every interval)."""
        return self._follower.poll() if self._follower is not None else 0

    # --- queries ------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._index.ntotal

    @property
    def factory(self) -> str:
        return self._index.factory

    @property
    def last_seq(self) -> int:
        return self._follower.last_seq if self._follower is not None else self._start_seq

    @property
    def feed_lag(self) -> FeedLag:
        """This index's position in its model's change feed and what it has not read yet."""
        return self._follower.lag if self._follower is not None else FeedLag(self._start_seq, self._start_seq)

    def ids(self) -> np.ndarray:
        return self._index.ids()

    @property
    def device(self) -> str:
        """Where the FAISS index lives: "cpu" or "cuda:N"."""
        return self._index.device

    @property
    def rerank(self) -> int:
        """Approximate candidates re-scored exactly per search: the setting, else 0 for an exact Flat index
        and DEFAULT_RERANK for any other."""
        if self._rerank is not None:
            return self._rerank
        return 0 if self._index.factory == "Flat" else DEFAULT_RERANK

    def search_settings(self) -> dict[str, int | None]:
        """The knobs in force: nprobe (IVF), ef_search (HNSW), rerank."""
        return {**self._index.search_params(), "rerank": self.rerank}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [B, k], segment ids [B, k]) by cosine; empty slots are (-inf, -1).

        With `rerank` > 0 the index returns max(k, rerank) candidates, which are re-scored with their
        exact CLS vectors from the token store: the result is the exact top-k of that pool.
        """
        if not self.rerank:
            return self._index.search(queries, k)
        _, ids = self._index.search(queries, max(k, self.rerank))
        return self._rescore(np.asarray(queries, np.float32), ids, k)

    def _rescore(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        assert self._store is not None, "open() first"
        q = np.array(queries, dtype=np.float32, order="C", ndmin=2)
        faiss.normalize_L2(q)
        out_s = np.full((len(ids), k), -np.inf, np.float32)
        out_i = np.full((len(ids), k), -1, np.int64)
        # A candidate whose record is gone (deleted since the search) drops out, as the index would have it.
        kept, vecs = read_cls(self._store, np.unique(ids[ids >= 0]))
        faiss.normalize_L2(vecs)
        row_of = {int(i): n for n, i in enumerate(kept)}
        for r in range(len(ids)):
            rows = [row_of[int(i)] for i in ids[r] if int(i) in row_of]
            if not rows:
                continue
            exact = vecs[rows] @ q[r]
            order = np.argsort(-exact, kind="stable")[:k]
            out_s[r, : len(order)], out_i[r, : len(order)] = exact[order], kept[rows][order]
        return out_s, out_i

    def tokens(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Frame tokens [N, T, D] fp16; raises token_store.MissingRecordError for ids without a record."""
        assert self._store is not None, "open() first"
        return self._store.get_tokens(np.asarray(ids, dtype=np.int64))

    def snapshot(self) -> dict[str, Any]:
        """Save the index atomically with the seq it reflects, then prune the changes it covers (older than
        the feed retention); returns the manifest."""
        with self._lock:
            manifest = self._index.save(
                self.path, {"model_id": self.model_id, "last_seq": self.last_seq, "rerank": self._rerank}
            )
        try:
            prune_model(self._factory, self.model_id, int(manifest["last_seq"]), self._feed_retention_s)
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as e:
            logger.warning(
                "snapshot saved, but the change feed was not pruned (%s); `indexer compact` does it", e
            )
        return manifest


def snapshot_manifest(data: DataDir, model_id: str) -> dict[str, Any]:
    """The manifest of a model's snapshot on disk (unverified), or {} when there is none readable."""
    try:
        manifest = json.loads(data.index_manifest(model_id).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def snapshot_factory(data: DataDir, model_id: str) -> str:
    """The factory recorded in a model's snapshot manifest, or "Flat"."""
    return str(snapshot_manifest(data, model_id).get("factory") or "Flat")


def open_for_model(
    data: DataDir, session_factory: sessionmaker[Session], model_id: str, factory: str = "Flat", **kwargs: Any
) -> LiveIndex:
    """A LiveIndex (not yet opened) for a model registered in the catalog, with its dims from there."""
    with session_scope(session_factory) as session:
        model = catalog.get_model(session, model_id)
    if model is None:
        raise IndexMismatchError(
            f"model {model_id!r} is not registered in the catalog; index videos with it first"
        )
    return LiveIndex(data, session_factory, model_id, model.dim, model.num_frames, factory, **kwargs)


def save_snapshot(
    data: DataDir,
    session_factory: sessionmaker[Session],
    model_id: str,
    *,
    rebuild: bool = False,
    factory: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Bring a model's snapshot up to date with the catalog (or rebuild it) and save it; any model, active or not.

    `factory=None` keeps the factory of the snapshot on disk (Flat when there is none); `kwargs` go to
    LiveIndex (nprobe, ef_search, rerank: saved in the manifest as the defaults of the processes that load
    it, and kept from the snapshot on disk when None and the factory stays; device: where the index is
    built, e.g. an IVF trained on a GPU).
    """
    current = snapshot_manifest(data, model_id)
    factory = factory or str(current.get("factory") or "Flat")
    if current.get("factory") == factory:
        for knob in ("nprobe", "ef_search", "rerank"):
            if kwargs.get(knob) is None and current.get(knob) is not None:
                kwargs[knob] = int(current[knob])
    index = open_for_model(data, session_factory, model_id, factory, **kwargs)
    try:
        index.open(follow=False, rebuild=rebuild, check_active=False)
        return index.snapshot()
    finally:
        index.close()
