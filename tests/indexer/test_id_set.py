"""SortedIdSet: the same answers as a plain set under random batches of adds and removes."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.id_set import SortedIdSet


@pytest.mark.parametrize("adopt", [False, True])
@pytest.mark.parametrize("block", [1, 3, 64])
def test_random_batches_agree_with_a_python_set(block: int, adopt: bool) -> None:
    rng = np.random.default_rng(block)
    start = rng.choice(5000, 300, replace=False).astype(np.int64)
    want = set(start.tolist())
    ids = SortedIdSet.adopt(start, block=block) if adopt else SortedIdSet(start, block=block)
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


def test_adopt_sorts_the_array_in_place_and_keeps_one_copy_of_duplicates() -> None:
    arr = np.array([9, 2, 7, 2, 5], np.int64)
    ids = SortedIdSet.adopt(arr, block=2)
    assert ids.to_array().tolist() == [2, 5, 7, 9] and len(ids) == 4
    unique = np.array([30, 10, 20], np.int64)
    SortedIdSet.adopt(unique)
    assert unique.tolist() == [10, 20, 30]  # taken over: sorted where it lies, not copied
    with pytest.raises(ValueError, match="int64"):
        SortedIdSet.adopt(np.array([1, 2], np.int32))
