"""Token store: round trips, checksums, freeing, cross-process visibility and layout checks."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from indexer.token_store import MissingRecordError, StoreLayoutError, TokenStore

T, D = 4, 16


def _records(ids: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((len(ids), T, D)).astype(np.float32), rng.standard_normal((len(ids), D))


def test_round_trip_across_shards_and_reopen(tmp_path: Path) -> None:
    ids = [0, 1, 2, 7, 8, 30]  # 4 records per shard: spans shards 0, 1, 2 and 7
    tokens, cls = _records(ids)
    with TokenStore(tmp_path, T, D, records_per_shard=4) as store:
        store.put_many(ids, tokens, cls)
        store.flush()
        order = [30, 0, 8]
        got = store.get_tokens(order)
        assert got.dtype == np.float16 and got.shape == (3, T, D)
        np.testing.assert_array_equal(got, tokens[[5, 0, 4]].astype(np.float16))
    with TokenStore(tmp_path, T, D, records_per_shard=4, readonly=True) as reader:
        tok, c = reader.get(ids)
        np.testing.assert_array_equal(tok, tokens.astype(np.float16))
        np.testing.assert_array_equal(reader.get_cls(ids), cls.astype(np.float16))
        np.testing.assert_array_equal(c, cls.astype(np.float16))
        assert reader.has([0, 3, 30, 31, 400]).tolist() == [True, False, True, False, False]
        batches = list(reader.iter_records(batch_size=2))
    assert np.concatenate([b[0] for b in batches]).tolist() == ids
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), cls.astype(np.float16))


def test_missing_ids_raise_and_name_the_ids(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, T, D, records_per_shard=8)
    store.put_many([1, 2], *_records([1, 2]))
    with pytest.raises(MissingRecordError) as err:
        store.get_tokens([1, 5, 2, 1000])  # 5: empty slot in a shard; 1000: shard never created
    assert err.value.ids == [5, 1000]
    assert "5, 1000" in str(err.value)
    assert store.verify([1, 5, 2, 1000]) == [5, 1000]
    store.close()


def test_checksum_detects_a_corrupt_record(tmp_path: Path) -> None:
    tokens, cls = _records([3, 4])
    tokens[0, 2, 5] = 1234.5  # a marker to find the record's bytes on disk without knowing the layout
    with TokenStore(tmp_path, T, D) as store:
        store.put_many([3, 4], tokens, cls)
        store.flush()
    (shard,) = tmp_path.glob("*.tok")
    raw = bytearray(shard.read_bytes())
    pos = raw.find(np.float16(1234.5).tobytes())
    assert pos > 0
    raw[pos] ^= 0x01
    shard.write_bytes(bytes(raw))
    with TokenStore(tmp_path, T, D, readonly=True) as reader:
        assert reader.has([3, 4]).tolist() == [False, True]
        valid, got = reader.get_cls_checked([3, 4])  # one read: validity and vectors together
        assert valid.tolist() == [False, True]
        np.testing.assert_array_equal(got[1], cls[1].astype(np.float16))
        assert reader.verify([3, 4]) == [3]
        with pytest.raises(MissingRecordError):
            reader.get_tokens([4, 3])
        assert [b[0].tolist() for b in reader.iter_records()] == [[4]]


def test_free_invalidates_and_reclaims_space(tmp_path: Path) -> None:
    ids = list(range(64))
    tokens, cls = _records(ids)
    with TokenStore(tmp_path, T, D * 32, records_per_shard=64) as store:  # ~4 KiB records
        big_tokens = np.repeat(tokens, 32, axis=2)
        store.put_many(ids, big_tokens, np.repeat(cls, 32, axis=1))
        store.flush()
        (shard,) = tmp_path.glob("*.tok")
        blocks_before = shard.stat().st_blocks
        store.free(list(range(0, 60)) + [999])
        store.flush()
        assert store.has([0, 59, 60, 63]).tolist() == [False, False, True, True]
        assert shard.stat().st_blocks < blocks_before * 0.5
        np.testing.assert_array_equal(store.get_tokens([61]), big_tokens[[61]].astype(np.float16))
        with pytest.raises(MissingRecordError):
            store.get_cls([10])


def _reader_main(root: str, opened, written, results) -> None:  # type: ignore[no-untyped-def]
    with TokenStore(Path(root), T, D, records_per_shard=4, readonly=True) as reader:
        before = reader.has([0, 1, 9]).tolist()
        opened.set()
        written.wait(30)
        tokens, _ = reader.get([1, 9])
        results.put((before, reader.has([0, 1, 9]).tolist(), tokens.astype(np.float32).sum()))


def test_reader_process_sees_records_written_after_it_opened(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    opened, written, results = ctx.Event(), ctx.Event(), ctx.Queue()
    writer = TokenStore(tmp_path, T, D, records_per_shard=4)
    writer.put_many([0], *_records([0]))
    writer.flush()
    proc = ctx.Process(target=_reader_main, args=(str(tmp_path), opened, written, results))
    proc.start()
    try:
        assert opened.wait(60)
        tokens, cls = _records([1, 9], seed=1)
        writer.put_many([1, 9], tokens, cls)  # 9 lands in a shard that did not exist when the reader opened
        writer.flush()
        written.set()
        before, after, total = results.get(timeout=60)
    finally:
        proc.join(30)
        writer.close()
    assert before == [True, False, False]
    assert after == [True, True, True]
    assert total == pytest.approx(tokens.astype(np.float16).astype(np.float32).sum())


def test_mismatched_layout_is_refused(tmp_path: Path) -> None:
    with TokenStore(tmp_path, T, D) as store:
        store.put_many([0], *_records([0]))
    with pytest.raises(StoreLayoutError, match="T and D"):
        TokenStore(tmp_path, T + 1, D)
    with pytest.raises(StoreLayoutError):
        TokenStore(tmp_path, T, D * 2, readonly=True)


def test_bad_input_is_rejected(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, T, D)
    tokens, cls = _records([0, 1])
    with pytest.raises(ValueError, match="expected tokens"):
        store.put_many([0, 1], tokens[:, :2], cls)
    with pytest.raises(ValueError, match="duplicate"):
        store.put_many([1, 1], tokens, cls)
    with pytest.raises(ValueError, match="fp16"):
        store.put_many([0, 1], tokens * 1e6, cls)
    with pytest.raises(ValueError, match="non-negative"):
        store.get_tokens([-1])
    store.close()
    with pytest.raises(PermissionError):
        TokenStore(tmp_path, T, D, readonly=True).put_many([0, 1], tokens, cls)


def test_reput_replaces_a_record(tmp_path: Path) -> None:
    with TokenStore(tmp_path, T, D) as store:
        store.put_many([5], *_records([5], seed=1))
        tokens, cls = _records([5], seed=2)
        store.put_many([5], tokens, cls)
        np.testing.assert_array_equal(store.get_tokens([5]), tokens.astype(np.float16))
