"""FAISS index over segment CLS vectors: inner product on L2-normalised vectors, keyed by segment id.

IVF indexes hold the segment ids in their inverted lists (``add_with_ids``); the others (Flat, HNSW, ...)
are wrapped in ``IndexIDMap2``, whose id -> position hash map is rebuilt on every load: for a compressed
IVF-PQ index (85 B a vector) that map, ~48 B a vector, was most of what a load held beside the file.

Over 400 lines: one class whose FAISS index, live-id set, tombstones, reader/writer lock, search knobs and
GPU placement are one piece of state that every method reads or changes together. Apart: the file I/O of
snapshots (snapshot.py), the id set (id_set.py), the lock (rw_lock.py), questions about a faiss index's
parts (faiss_parts.py), building an index in one go (index_build.py) and the device choice (index_device.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from indexer.errors import IndexerError
from indexer.faiss_parts import (
    can_remove,
    gpu_cloner_options,
    gpu_unavailable_reason,
    hnsw_part,
    ivf_part,
    list_ids,
    omp_threads,
    pq_centroids,
    stores_ids,
    unwrap_ivf,
)
from indexer.id_set import SortedIdSet
from indexer.rw_lock import RWLock
from indexer.snapshot import SNAPSHOT_FORMAT, CorruptSnapshotError, read_snapshot, write_snapshot

logger = logging.getLogger(__name__)

MIN_TRAIN_PER_CENTROID = 39  # below this faiss's k-means warns that centroids are poorly estimated
TRAIN_PER_CENTROID = 256  # faiss's k-means samples down to this many points per centroid anyway
MAX_TRAIN_SAMPLE = 131_072  # k-means time and the sample's float32 copy stay bounded on any library size
ADD_SLICE_SECONDS = 0.001  # work per hold of the write lock while a live add runs: what a search waits for
# Vectors in a live add's first slice; later slices are sized from its time. Appending codes (IVF, Flat)
# costs microseconds a vector; an HNSW insert ~0.5 ms at 1M, so its first slice is one vector.
ADD_SLICE_FIRST = 8
ADD_SLICE_MAX = 4096
_TORCH_BLOCK_ROWS = 65536  # database rows per matmul block in batched exact search
_GPU_MAX_K = 2048  # faiss GPU k-selection limit (GPU_MAX_SELECTION_K)
_GPU_MAX_TOMBSTONES = 512  # deleted ids a GPU index filters after search before it is compacted


class VectorIndexError(IndexerError):
    """Base class for vector index errors."""


class DuplicateIdError(VectorIndexError, ValueError):
    """Ids are already in the index (live, or removed but awaiting compaction)."""


class TrainingError(VectorIndexError, ValueError):
    """The index cannot be trained from the given vectors, or is used before training."""


def as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size and (arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"ids must be a 1-D sequence of integers, got shape {arr.shape} {arr.dtype}")
    return arr.astype(np.int64).reshape(-1)


class VectorIndex:
    """``faiss.index_factory(dim, factory, METRIC_INNER_PRODUCT)``, in an ``IndexIDMap2`` unless it is an
    IVF index (which stores the ids itself).

    Vectors are L2-normalised on the way in, queries too, so scores are cosine similarities.
    Indexes that cannot remove (HNSW) keep a tombstone set excluded at search; rebuilding compacts.
    """

    def __init__(
        self,
        dim: int,
        factory: str = "Flat",
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        threads: int | None = None,
    ):
        if "IDMap" in factory:
            raise ValueError(f"factory {factory!r}: leave out IDMap, ids are mapped by VectorIndex")
        try:
            base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"faiss cannot build factory {factory!r} for dim {dim}: {e}") from e
        index = base if stores_ids(base) else faiss.IndexIDMap2(base)
        self._setup(index, dim, factory, np.zeros(0, np.int64))
        self.set_search_params(nprobe=nprobe, ef_search=ef_search, threads=threads)

    def _setup(self, index: Any, dim: int, factory: str, tombstones: np.ndarray) -> None:
        self._index: Any = index  # IndexIDMap2 or an IVF index; or its GPU clone
        self._mapped = isinstance(index, faiss.IndexIDMap2)  # a GPU clone keeps the CPU wrapper
        self.dim, self.factory = dim, factory
        self._lock = RWLock()
        base = faiss.downcast_index(self._base)
        self._removable = can_remove(base)
        self._flat = base if type(base) is faiss.IndexFlat else None  # enables the torch batched path
        self._gpu_res: Any = None
        self._gpu_device = 0
        self.cpu_reason = ""  # why to_gpu() left the index on the CPU
        self._threads = 1
        tombstones = np.unique(tombstones)
        if len(tombstones) and self._removable:  # deletes a GPU index held as tombstones: removed now
            index.remove_ids(faiss.IDSelectorBatch(tombstones))
            tombstones = tombstones[:0]
        self._tombstones = tombstones
        all_ids = faiss.vector_to_array(index.id_map) if self._mapped else list_ids(base)
        if len(tombstones):
            all_ids = all_ids[~np.isin(all_ids, tombstones)]
        # No copy of the ids: a load peaks at the index + 8 B a vector.
        self._live = SortedIdSet.adopt(all_ids)
        self._params: Any = None
        self._selector: Any = None
        self._refresh_params()

    @property
    def _base(self) -> Any:
        """The index that holds the vectors: inside the IndexIDMap2, or the (IVF) index itself."""
        return self._index.index if self._mapped else self._index

    # --- configuration -------------------------------------------------------------------------------
    def set_search_params(
        self, *, nprobe: int | None = None, ef_search: int | None = None, threads: int | None = None
    ) -> None:
        """Search-time knobs: IVF ``nprobe`` (lists scanned), HNSW ``efSearch`` (candidate pool) and the
        OpenMP threads one search call uses (default 1: on a shared 2-core host a second thread made
        searches slower, see bench/ann_recall.py; concurrent requests still run in parallel)."""
        with self._lock.write():
            if threads is not None:
                if threads < 1:
                    raise ValueError(f"threads must be >= 1, got {threads}")
                self._threads = threads
            base = self._base
            if nprobe is not None:
                ivf = ivf_part(base)
                if ivf is None or nprobe < 1:
                    raise ValueError(
                        f"nprobe={nprobe} needs an IVF factory and a value >= 1 ({self.factory!r})"
                    )
                ivf.nprobe = min(nprobe, getattr(ivf, "nlist", nprobe))
            if ef_search is not None:
                hnsw = hnsw_part(base)
                if hnsw is None or ef_search < 1:
                    raise ValueError(
                        f"ef_search={ef_search} needs an HNSW factory and a value >= 1 ({self.factory!r})"
                    )
                hnsw.hnsw.efSearch = ef_search
            self._refresh_params()

    def search_params(self) -> dict[str, int | None]:
        ivf = ivf_part(self._base)
        hnsw = hnsw_part(self._base)
        return {"nprobe": ivf.nprobe if ivf else None, "ef_search": hnsw.hnsw.efSearch if hnsw else None}

    def _refresh_params(self) -> None:
        # Tombstones are excluded inside the search (IDSelector) so HNSW still returns k live results.
        if not len(self._tombstones) or self._gpu_res is not None:
            self._params = self._selector = None
            return
        batch = faiss.IDSelectorBatch(self._tombstones)
        self._selector = (batch, faiss.IDSelectorNot(batch))  # params do not own their selectors
        top = faiss.downcast_index(self._base)
        if isinstance(top, faiss.IndexHNSW):  # its params type also carries efSearch, which would reset
            self._params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
            self._params.efSearch = top.hnsw.efSearch
        else:
            self._params = faiss.SearchParameters()
        self._params.sel = self._selector[1]

    # --- state ---------------------------------------------------------------------------------------
    @property
    def needs_training(self) -> bool:
        return not self._base.is_trained

    @property
    def ntotal(self) -> int:
        """Live vectors (tombstoned ids excluded)."""
        return len(self._live)

    def __len__(self) -> int:
        return len(self._live)

    def ids(self) -> np.ndarray:
        """Sorted int64 array of live ids."""
        return self._live.to_array()

    def contains(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """bool [N]: which ids are live in the index."""
        return self._live.contains(as_ids(ids))

    def __contains__(self, segment_id: object) -> bool:
        return isinstance(segment_id, int | np.integer) and bool(self.contains([int(segment_id)])[0])

    def _prepare(self, vecs: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
        if isinstance(vecs, torch.Tensor):
            vecs = vecs.detach().cpu().float().numpy()
        x = np.array(vecs, dtype=np.float32, order="C", ndmin=2)  # a copy: normalised in place
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what} must be [N, {self.dim}], got {tuple(np.shape(vecs))}")
        if not np.isfinite(x).all():
            raise ValueError(f"{what} contain NaN or inf")
        faiss.normalize_L2(x)
        return x

    # --- mutation ------------------------------------------------------------------------------------
    def _centroids(self) -> int:
        base = self._base
        ivf = faiss.try_extract_index_ivf(base)
        return max(ivf.nlist if ivf is not None else 1, pq_centroids(base))

    @property
    def train_sample_size(self) -> int:
        """The most vectors train() uses (a random sample of more): 256 per centroid of the largest
        quantizer, at most MAX_TRAIN_SAMPLE but never under the 39 per centroid k-means needs; 0 when the
        factory needs no training."""
        if not self.needs_training:
            return 0
        centroids = self._centroids()
        return max(MIN_TRAIN_PER_CENTROID * centroids, min(TRAIN_PER_CENTROID * centroids, MAX_TRAIN_SAMPLE))

    def train(self, vecs: np.ndarray | torch.Tensor, *, seed: int = 0) -> None:
        """Train IVF/PQ quantizers from stored CLS vectors (a random sample of ``train_sample_size`` of them
        when there are more); a no-op for factories that need no training."""
        sample = self.train_sample_size
        if sample and len(vecs) > sample:
            rows = np.sort(np.random.default_rng(seed).choice(len(vecs), sample, replace=False))
            vecs = vecs[rows]
        x = self._prepare(vecs, "training vectors")
        with self._lock.write():
            if not self.needs_training:
                return
            centroids = self._centroids()
            need = MIN_TRAIN_PER_CENTROID * centroids if centroids > 1 else 1
            if len(x) < need:
                raise TrainingError(
                    f"factory {self.factory!r} needs at least {need} training vectors ({MIN_TRAIN_PER_CENTROID} per "
                    f"centroid x {centroids}), got {len(x)}; use factory 'Flat' for a library this small "
                    "(or a smaller nlist)"
                )
            # k-means assignment is a batched search: let it use BLAS (faiss-cpu defaults to >=128000 rows).
            saved = faiss.cvar.distance_compute_blas_threshold
            faiss.cvar.distance_compute_blas_threshold = 20
            try:
                self._index.train(x)
            finally:
                faiss.cvar.distance_compute_blas_threshold = saved

    def add(
        self,
        ids: Iterable[int] | np.ndarray,
        vecs: np.ndarray | torch.Tensor,
        *,
        slice_size: int | None = None,
    ) -> None:
        """Add vectors [N, D] under segment ids [N]; ids already present raise DuplicateIdError.

        A live add (``slice_size`` None) runs on one OpenMP thread (the searches need the other core) and
        takes the write lock in slices of about ADD_SLICE_SECONDS of work each, so that a search waits for
        one short slice, not the batch; searches between slices see part of the batch. Where the index has
        a standalone codec (IVF, Flat) the batch is encoded before any lock is taken (for IVF-PQ the
        coarse assignment is ~90% of an add: 18 ms for 64 vectors over 4,096 lists) and the slices only
        append codes; HNSW inserts into its graph under the lock, a few vectors a slice. With an int
        ``slice_size`` the vectors go in that many at a time with faiss's default threads: building an
        index nothing searches yet, pass the whole batch (faiss adds large batches faster)."""
        arr, x = as_ids(ids), self._prepare(vecs, "vectors")
        if len(arr) != len(x):
            raise ValueError(f"got {len(arr)} ids for {len(x)} vectors")
        if len(np.unique(arr)) != len(arr):
            raise DuplicateIdError("the same id appears twice in one add() call")
        if slice_size is not None:
            self._add_slices(arr, x, max(slice_size, 1), None, timed=False)
            return
        with omp_threads(1):
            encoded = self._encode(x)
            self._add_slices(arr, x, ADD_SLICE_FIRST if encoded is not None else 1, encoded, timed=True)

    def _encode(self, x: np.ndarray) -> tuple[Any, np.ndarray] | None:
        """(the index encoded for, codes) for an index whose codes can be computed without the lock; None
        for the others (HNSW, GPU, untrained: those add the vectors under the lock)."""
        index = self._index
        base = faiss.downcast_index(self._base)
        if self._gpu_res is not None or not isinstance(base, faiss.IndexIVF | faiss.IndexFlat):
            return None
        if not base.is_trained or not len(x):
            return None
        return index, base.sa_encode(x)  # reads only the trained quantizers, which adds never change

    def _add_slices(
        self,
        arr: np.ndarray,
        x: np.ndarray,
        step: int,
        encoded: tuple[Any, np.ndarray] | None,
        *,
        timed: bool,
    ) -> None:
        start, first = 0, True
        while first or start < len(arr):
            part = slice(start, start + step)
            with self._lock.write():
                # All ids checked with the first slice: a duplicate is refused before anything is added.
                self._check_addable(arr if first else arr[part])
                began = time.perf_counter()
                if encoded is not None and encoded[0] is self._index:  # not moved to a GPU meanwhile
                    self._index.add_sa_codes(encoded[1][part], arr[part])
                else:
                    self._index.add_with_ids(x[part], arr[part])
                took = time.perf_counter() - began
                self._live.add(arr[part])  # O(slice), not O(index)
            start, first = start + step, False
            if timed:
                step = int(min(max(step * ADD_SLICE_SECONDS / max(took, 1e-6), 1), ADD_SLICE_MAX))

    def _check_addable(self, arr: np.ndarray) -> None:
        if self.needs_training:
            raise TrainingError(f"factory {self.factory!r} must be trained before add(): call train(vecs)")
        dup = arr[self.contains(arr) | np.isin(arr, self._tombstones)]
        if len(dup):
            raise DuplicateIdError(
                f"ids already in the index: {dup[:10].tolist()}; remove() them first (ids removed from an "
                "index that cannot delete, e.g. HNSW, stay reserved until the index is rebuilt)"
            )

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Remove ids (absent ids are ignored); returns how many were removed."""
        arr = np.unique(as_ids(ids))
        with self._lock.write():
            gone = arr[self.contains(arr)]
            if not len(gone):
                return 0
            if self._removable:
                self._index.remove_ids(faiss.IDSelectorBatch(gone))
            else:
                self._tombstones = np.union1d(self._tombstones, gone)
                if self._gpu_res is not None and len(self._tombstones) > _GPU_MAX_TOMBSTONES:
                    self._compact_gpu()
            self._live.discard(gone)
            self._refresh_params()
            return len(gone)

    # --- search --------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine: (scores float32 [B, k], ids int64 [B, k]); missing slots are (-inf, -1)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = self._prepare(queries, "queries")
        with self._lock.read():
            if not len(self._live):
                return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
            if self._flat is not None and len(q) > 1:
                scores, ids = self._search_torch(q, k)
            else:
                fetch = k + len(self._tombstones) if self._gpu_res is not None else k
                index = self._index
                if self._gpu_res is not None and fetch > _GPU_MAX_K:
                    # Beyond the GPU's top-k limit (a selective filter's over-fetch): rare, so a CPU copy.
                    logger.debug("k=%d is over the GPU limit %d: searching a CPU copy", fetch, _GPU_MAX_K)
                    index = faiss.index_gpu_to_cpu(self._index)
                with omp_threads(self._threads):
                    scores, ids = index.search(q, fetch, params=self._params)
                if fetch > k:  # on a GPU, tombstones are filtered after the search
                    scores, ids = _drop(scores, ids, self._tombstones, k)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _search_torch(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # Exact batched search as a matmul: torch's GEMM beats faiss's bundled BLAS several-fold here.
        assert self._flat is not None
        n = self._flat.ntotal
        xb = faiss.rev_swig_ptr(self._flat.get_xb(), n * self.dim).reshape(n, self.dim)
        id_map = faiss.rev_swig_ptr(self._index.id_map.data(), n)
        qt = torch.from_numpy(q)
        best_s, best_i = torch.empty((len(q), 0)), torch.empty((len(q), 0), dtype=torch.long)
        for start in range(0, n, _TORCH_BLOCK_ROWS):
            s = qt @ torch.from_numpy(xb[start : start + _TORCH_BLOCK_ROWS]).T  # [B, rows]
            top_s, top_i = torch.topk(s, min(k, s.shape[1]), dim=1)
            cand_s, cand_i = torch.cat([best_s, top_s], 1), torch.cat([best_i, top_i + start], 1)
            best_s, pick = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
            best_i = torch.gather(cand_i, 1, pick)
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        scores[:, : best_s.shape[1]] = best_s.numpy()
        ids[:, : best_i.shape[1]] = id_map[best_i.numpy()]
        return scores, ids

    # --- devices and snapshots -----------------------------------------------------------------------
    def to_gpu(self, device: int = 0) -> bool:
        """Clone the index to GPU ``device`` (fp16 storage) when faiss has GPU support, the device exists and
        the factory can move; False otherwise, with the reason in ``cpu_reason`` (the caller logs it)."""
        reason = gpu_unavailable_reason(device)
        if reason is None:
            with self._lock.write():
                if self._gpu_res is not None:
                    return True
                res = faiss.StandardGpuResources()
                try:
                    gpu_index: Any = faiss.index_cpu_to_gpu(res, device, self._index, gpu_cloner_options())
                except RuntimeError as e:
                    reason = (
                        f"factory {self.factory!r} cannot move to the GPU ({str(e).strip().splitlines()[0]})"
                    )
                else:
                    self._index, self._gpu_res, self._flat = gpu_index, res, None
                    self._gpu_device = device
                    self._removable = can_remove(self._base)
                    self._refresh_params()
                    return True
        self.cpu_reason = reason
        return False

    @property
    def device(self) -> str:
        """Where the index lives: "cpu" or "cuda:N"."""
        return "cpu" if self._gpu_res is None else f"cuda:{self._gpu_device}"

    def _cpu_copy(self) -> Any:
        return faiss.index_gpu_to_cpu(self._index) if self._gpu_res is not None else self._index

    def _compact_gpu(self) -> None:
        # GPU indexes cannot remove ids: deleted ids are tombstones filtered after each search, which asks
        # for k + len(tombstones). Past a bound, drop them from a CPU copy and clone that back.
        cpu: Any = faiss.index_gpu_to_cpu(self._index)
        if not can_remove(cpu.index if self._mapped else cpu):
            return
        cpu.remove_ids(faiss.IDSelectorBatch(self._tombstones))
        self._index = faiss.index_cpu_to_gpu(self._gpu_res, self._gpu_device, cpu, gpu_cloner_options())
        self._tombstones = np.zeros(0, np.int64)

    def save(self, path: Path | str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Atomically write ``path`` and ``path.manifest.json``; returns the manifest written."""
        with self._lock.read():
            cpu = self._cpu_copy()  # snapshots are always CPU indexes: any process can load them
            full = {
                **manifest,
                "format": SNAPSHOT_FORMAT,
                "count": len(self._live),
                "factory": self.factory,
                "dim": self.dim,
                "tombstones": self._tombstones.tolist(),
                **self.search_params(),
            }
            return write_snapshot(cpu, Path(path), full)

    @classmethod
    def load(
        cls,
        path: Path | str,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        threads: int | None = None,
    ) -> tuple[VectorIndex, dict[str, Any]]:
        """Load a snapshot written by save(); raises CorruptSnapshotError if it does not verify.
        nprobe/ef_search default to the values saved in the manifest."""
        path = Path(path)
        manifest, index = read_snapshot(path)
        tombstones = np.asarray(manifest.get("tombstones", []), np.int64)
        if isinstance(index, faiss.IndexIDMap2) and stores_ids(faiss.downcast_index(index.index)):
            index = unwrap_ivf(index, path)  # format 1: IVF indexes were wrapped too
        if (
            not (isinstance(index, faiss.IndexIDMap2) or stores_ids(index))
            or index.d != manifest["dim"]
            or index.ntotal != manifest["count"] + len(tombstones)
        ):
            raise CorruptSnapshotError(
                f"{path} does not match its manifest (dim/count); rebuild it from the token store"
            )
        obj = cls.__new__(cls)
        obj._setup(index, int(manifest["dim"]), str(manifest["factory"]), tombstones)
        obj.set_search_params(
            nprobe=nprobe or manifest.get("nprobe"),
            ef_search=ef_search or manifest.get("ef_search"),
            threads=threads,
        )
        return obj, manifest


def _drop(
    scores: np.ndarray, ids: np.ndarray, tombstones: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    keep = ~np.isin(ids, tombstones)
    out_s, out_i = np.full((len(ids), k), -np.inf, np.float32), np.full((len(ids), k), -1, np.int64)
    for row in range(len(ids)):
        s, i = scores[row][keep[row]][:k], ids[row][keep[row]][:k]
        out_s[row, : len(s)], out_i[row, : len(i)] = s, i
    return out_s, out_i
