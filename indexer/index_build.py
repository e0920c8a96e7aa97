"""Building a new FAISS index in one go: from vectors in hand, or from a reader (the token store) in chunks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from indexer.vector_index import VectorIndex, as_ids

BUILD_CHUNK = 65_536  # vectors read and added at a time when an index is built from a reader


def build_index(
    dim: int,
    factory: str,
    ids: Iterable[int] | np.ndarray,
    vecs: np.ndarray | torch.Tensor,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    threads: int | None = None,
) -> VectorIndex:
    """A new index holding ``vecs`` under ``ids``, trained on the same vectors when the factory needs it."""
    index = VectorIndex(dim, factory, nprobe=nprobe, ef_search=ef_search, threads=threads)
    if index.needs_training:
        index.train(vecs)
    index.add(ids, vecs, slice_size=len(vecs))
    return index


VectorReader = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def build_index_from(
    dim: int,
    factory: str,
    ids: Iterable[int] | np.ndarray,
    read: VectorReader,
    *,
    chunk: int = BUILD_CHUNK,
    seed: int = 0,
) -> VectorIndex:
    """A new index over ``ids``, whose vectors ``read(ids) -> (ids found, vectors)`` supplies: trained on a
    random sample of ``train_sample_size`` ids, then filled ``chunk`` ids at a time, so that no more than
    the index and one chunk are in RAM (never every vector as float32 just to train). Ids ``read`` does
    not return are left out."""
    arr = as_ids(ids)
    index = VectorIndex(dim, factory)
    if index.needs_training:
        size = min(len(arr), index.train_sample_size)
        sample = np.sort(np.random.default_rng(seed).choice(arr, size, replace=False))
        index.train(read(sample)[1])
    for start in range(0, len(arr), chunk):
        found, vecs = read(arr[start : start + chunk])
        index.add(found, vecs, slice_size=len(found))
    return index
