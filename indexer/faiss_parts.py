"""What a faiss index is made of, asked and handled the same way wherever VectorIndex needs it: its IVF,
HNSW and PQ parts, where it keeps ids, whether it can remove, GPU support, and OpenMP threads per call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.snapshot import CorruptSnapshotError


def can_remove(index: faiss.Index) -> bool:
    try:
        index.remove_ids(faiss.IDSelectorRange(0, 0))
    except RuntimeError:
        return False
    return True


def ivf_part(index: faiss.Index) -> Any:
    """The IVF part of a CPU index, or a GPU IVF clone (which has nprobe too); None for other types."""
    ivf: Any = faiss.try_extract_index_ivf(index)
    if ivf is None:
        inner = faiss.downcast_index(index)
        ivf = inner if type(inner).__name__.startswith("GpuIndexIVF") else None
    return ivf


def stores_ids(base: faiss.Index) -> bool:
    """Whether ``base`` keeps the ids given to add_with_ids itself (an IVF index, in its inverted lists), so
    that no IndexIDMap2 is needed. HNSW and Flat number their vectors 0..n-1 and need the map."""
    return isinstance(base, faiss.IndexIVF)


def list_ids(ivf: Any) -> np.ndarray:
    """Every id an IVF index's inverted lists hold, list after list (int64 [ntotal], one copy)."""
    invlists = ivf.invlists
    out, at = np.empty(ivf.ntotal, np.int64), 0
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size:
            ptr = invlists.get_ids(lst)
            out[at : at + size] = faiss.rev_swig_ptr(ptr, size)
            invlists.release_ids(lst, ptr)
            at += size
    return out[:at]


def unwrap_ivf(mapped: Any, path: Path) -> Any:
    """A copy of the IVF index inside an IndexIDMap2 snapshot (written before IVF indexes held their own
    ids), with its inverted lists' positions replaced by the segment ids they stand for.

    Raises CorruptSnapshotError when the positions are not 0..n-1 once each: IndexIDMap2 compacts its id
    map on remove_ids while an IVF index keeps the positions it gave, so an old snapshot saved after a
    delete maps some vectors to the wrong segments."""
    ivf: Any = faiss.downcast_index(mapped.index)
    invlists, id_map = ivf.invlists, faiss.vector_to_array(mapped.id_map)
    seen = np.zeros(len(id_map), bool)
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if not size:
            continue
        ptr = invlists.get_ids(lst)
        pos = faiss.rev_swig_ptr(ptr, size)  # a view: rewritten in place
        valid = pos.min() >= 0 and pos.max() < len(id_map)
        if valid:
            seen[pos] = True
            pos[:] = id_map[pos]
        invlists.release_ids(lst, ptr)
        if not valid:
            break
    if np.count_nonzero(seen) != ivf.ntotal:  # positions out of range, or some twice
        raise CorruptSnapshotError(
            f"{path}: an IVF snapshot in the IndexIDMap2 layout whose positions a delete shifted (a "
            "segment's vector may answer for another); rebuild it from the token store"
        )
    # A copy the caller owns, made once per old snapshot (its next save is in the new layout): handing the
    # wrapper's sub-index over by SWIG ownership flags left faiss's Python types broken once it was freed.
    return faiss.clone_index(ivf)


def hnsw_part(index: faiss.Index) -> Any:
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def gpu_unavailable_reason(device: int = 0) -> str | None:
    """None when faiss can put an index on GPU ``device``; otherwise why not, in words."""
    if not hasattr(faiss, "StandardGpuResources"):
        return "faiss has no GPU support (faiss-cpu is installed; the `gpu` extra installs faiss-gpu)"
    visible = faiss.get_num_gpus()
    if device >= visible:
        return f"faiss sees {visible} CUDA device(s), so there is no cuda:{device}"
    return None


def gpu_cloner_options() -> Any:
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True  # half the GPU memory; scores within fp16 rounding of the CPU index's
    return options


def pq_centroids(base: faiss.Index) -> int:
    for candidate in (faiss.downcast_index(base), faiss.try_extract_index_ivf(base)):
        pq = getattr(faiss.downcast_index(candidate), "pq", None) if candidate is not None else None
        if pq is not None:
            return int(pq.ksub)
    return 1


@contextmanager
def omp_threads(n: int) -> Iterator[None]:
    """Run with n OpenMP threads in this thread, then restore the previous count.

    faiss and torch share one libgomp (torch loads it into the global symbol scope) and the thread count
    is a per-thread setting of that runtime, so a bare faiss.omp_set_num_threads(1) also left every later
    torch op in the calling thread on one core: the search service's batch thread, which encodes the next
    queries, lost its second thread (one query encoded in 19.5 ms instead of 12.4, see docs/BENCHMARKS.md).
    """
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
