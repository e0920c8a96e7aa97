"""SortedIdSet: the same answers as a plain set under random batches of adds and removes."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.id_set import SortedIdSet


@pytest.mark.parametrize("block", [1, 3, 64])
def test_random_batches_agree_with_a_python_set(block: int) -> None:
    rng = np.random.default_rng(block)
    start = rng.choice(5000, 300, replace=False)
    ids, want = SortedIdSet(start, block=block), set(start.tolist())
    for step in range(200):
        batch = rng.integers(0, 5000, rng.integers(0, 40))
        if step % 3 == 2:
            ids.discard(batch)
            want -= set(batch.tolist())
        else:
            fresh = np.setdiff1d(batch, np.fromiter(want, np.int64, len(want)))
            ids.add(fresh)
            want |= set(fresh.tolist())
        probe = rng.integers(-5, 5005, 50)
        assert ids.contains(probe).tolist() == [int(p) in want for p in probe]
        assert len(ids) == len(want)
    assert ids.to_array().tolist() == sorted(want)


def test_increasing_ids_append_and_blocks_stay_bounded() -> None:
    ids = SortedIdSet(block=4)
    for start in range(0, 100, 7):  # autoincrement segment ids arrive in increasing batches
        ids.add(np.arange(start, min(start + 7, 100)))
    assert ids.to_array().tolist() == list(range(100)) and len(ids) == 100
    ids.discard(np.arange(0, 100, 2))
    assert ids.to_array().tolist() == list(range(1, 100, 2))
    ids.discard(np.arange(100))
    assert len(ids) == 0 and not ids.contains(np.array([1])).any() and ids.to_array().size == 0
    ids.add(np.array([5, 1]))
    assert ids.to_array().tolist() == [1, 5]


def test_block_must_be_positive() -> None:
    with pytest.raises(ValueError, match="block must be >= 1"):
        SortedIdSet(block=0)
