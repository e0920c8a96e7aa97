"""A sorted set of int64 ids in bounded blocks: adding or removing a batch costs O(batch · block), not O(set)."""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

BLOCK = 4096  # ids per block after a split; a block is split when it doubles


class SortedIdSet:
    """Sorted, unique int64 ids kept as a list of sorted numpy blocks plus each block's last id.

    A batch only touches the blocks its ids fall into (for increasing ids, such as autoincrement segment
    ids, just the last one), so applying it copies at most a few blocks, never the whole set: a live index
    applies change batches under its write lock, and a copy the size of the index there stalls searches.
    """

    def __init__(self, ids: np.ndarray | None = None, block: int = BLOCK) -> None:
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self._block = block
        arr = np.unique(np.asarray(ids if ids is not None else [], dtype=np.int64))
        self._blocks = [arr[i : i + block].copy() for i in range(0, len(arr), block)]
        self._count = len(arr)
        self._refresh_lasts()

    @classmethod
    def adopt(cls, ids: np.ndarray, block: int = BLOCK) -> SortedIdSet:
        """A set over ``ids`` (a 1-D int64 array, any order) that takes the array over: it is sorted in
        place and the blocks are views of it, so the set of a large index costs no copy of its ids (a
        snapshot load's peak memory: np.unique's copies and one array a block were ~3x the ids). Blocks
        are replaced, never written, so the views stay valid; the caller must not use ``ids`` afterwards."""
        if ids.dtype != np.int64 or ids.ndim != 1:
            raise ValueError(f"adopt() takes a 1-D int64 array, got {ids.dtype} {ids.shape}")
        ids.sort()
        if len(ids) > 1 and not (ids[1:] != ids[:-1]).all():
            ids = np.unique(ids)  # duplicates: a copy, as the constructor makes
        out = cls(block=block)
        out._blocks = [ids[i : i + block] for i in range(0, len(ids), block)]
        out._count = len(ids)
        out._refresh_lasts()
        return out

    def _refresh_lasts(self) -> None:
        # O(blocks): N / block entries, thousands of times smaller than the ids themselves.
        self._lasts = np.fromiter((b[-1] for b in self._blocks), np.int64, len(self._blocks))

    def __len__(self) -> int:
        return self._count

    def _block_of(self, ids: np.ndarray) -> np.ndarray:
        """For each id, the block it belongs in: the first whose last id is >= it (ids past the end: the last)."""
        return np.minimum(np.searchsorted(self._lasts, ids), max(len(self._blocks) - 1, 0))

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """bool [N]: which of ``ids`` (int64 [N], any order) are in the set."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.zeros(len(arr), bool)
        if not self._blocks or not len(arr):
            return out
        where = self._block_of(arr)
        for b in np.unique(where):
            rows = np.flatnonzero(where == b)
            block = self._blocks[b]
            pos = np.minimum(np.searchsorted(block, arr[rows]), len(block) - 1)
            out[rows] = block[pos] == arr[rows]
        return out

    def add(self, ids: np.ndarray) -> None:
        """Insert ids that are not in the set yet (sorted or not; the caller checks for duplicates)."""
        new = np.unique(np.asarray(ids, dtype=np.int64))
        if not len(new):
            return
        if not self._blocks:
            self._blocks = [new[i : i + self._block].copy() for i in range(0, len(new), self._block)]
        else:
            where = self._block_of(new)
            for b in np.unique(where)[::-1]:  # from the end, so that splits do not shift blocks still to do
                part = new[where == b]
                block = self._blocks[b]
                merged = np.insert(block, np.searchsorted(block, part), part)
                pieces = [merged[i : i + self._block] for i in range(0, len(merged), self._block)]
                self._blocks[b : b + 1] = pieces if len(merged) >= 2 * self._block else [merged]
        self._count += len(new)
        self._refresh_lasts()

    def discard(self, ids: np.ndarray) -> None:
        """Remove the ids that are in the set; absent ids are ignored."""
        arr = np.unique(np.asarray(ids, dtype=np.int64))
        arr = arr[self.contains(arr)]
        if not len(arr):
            return
        where = self._block_of(arr)
        for b in np.unique(where)[::-1]:
            block = self._blocks[b]
            kept = np.delete(block, np.searchsorted(block, arr[where == b]))
            self._blocks[b : b + 1] = [kept] if len(kept) else []
        self._count -= len(arr)
        self._refresh_lasts()

    def to_array(self) -> np.ndarray:
        """All ids, sorted (a new int64 array)."""
        return np.concatenate(self._blocks) if self._blocks else np.zeros(0, np.int64)
