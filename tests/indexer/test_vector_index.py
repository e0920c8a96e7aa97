"""Vector index: exactness against brute force, deletion, approximate recall, snapshots and their atomicity."""

from __future__ import annotations

import json
import os
import threading
import tracemalloc
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer import snapshot, vector_index
from indexer.index_build import build_index, build_index_from
from indexer.snapshot import CorruptSnapshotError, SnapshotNotFoundError
from indexer.vector_index import DuplicateIdError, TrainingError, VectorIndex

D = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _mixture(n: int, clusters: int, dim: int = D, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors like CLIP embeddings: a shared direction, a cluster centre and noise."""
    rng = np.random.default_rng(seed)
    common = _unit(rng.standard_normal((1, dim)))
    centres = _unit(rng.standard_normal((clusters, dim)))
    noise = _unit(rng.standard_normal((n, dim)))
    return _unit(0.55 * common + 0.55 * centres[rng.integers(0, clusters, n)] + 0.63 * noise)


def _exact(db: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = _unit(q) @ db.T
    top = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, top, 1), ids[top]


@pytest.mark.parametrize("batch", [1, 7])  # one query goes through faiss, batches through a torch matmul
def test_flat_search_is_exact(batch: int) -> None:
    rng = np.random.default_rng(batch)
    db, ids = _mixture(500, 10), rng.permutation(10_000)[:500].astype(np.int64)
    index = build_index(D, "Flat", ids, db * 3.0)  # unnormalised input: normalised on the way in
    q = rng.standard_normal((batch, D)).astype(np.float32)
    scores, got = index.search(q, 10)
    want_scores, want = _exact(db, ids, q, 10)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_k_beyond_size_pads_with_minus_one(batch: int) -> None:
    index = build_index(D, "Flat", [4, 9], _mixture(2, 2))
    scores, ids = index.search(_mixture(batch, 2, seed=1), 5)
    assert ids.shape == (batch, 5) and (ids[:, 2:] == -1).all() and np.isneginf(scores[:, 2:]).all()
    assert set(ids[0, :2].tolist()) == {4, 9}
    empty = VectorIndex(D)
    assert empty.search(np.ones(D, np.float32), 3)[1].tolist() == [[-1, -1, -1]]


def test_flat_remove_and_membership() -> None:
    db = _mixture(200, 5)
    index = build_index(D, "Flat", np.arange(100, 300), db)
    assert index.remove([100, 150, 999]) == 2
    assert index.ntotal == len(index) == 198
    assert 150 not in index and 151 in index and np.int64(151) in index and "151" not in index
    assert index.contains([100, 101, 5]).tolist() == [False, True, False]
    _, ids = index.search(db[[0, 50]], 5)
    assert not np.isin(ids, [100, 150]).any()
    assert ids[0, 0] != 100 and ids[1, 0] != 150
    index.add([150], db[[50]])  # a removable index takes a removed id back
    assert index.search(db[50], 1)[1][0, 0] == 150


def test_duplicate_and_malformed_adds_are_refused() -> None:
    index = build_index(D, "Flat", [1, 2], _mixture(2, 2))
    with pytest.raises(DuplicateIdError, match=r"\[2\]"):
        index.add([3, 2], _mixture(2, 2))
    with pytest.raises(DuplicateIdError):
        index.add([5, 5], _mixture(2, 2))
    with pytest.raises(ValueError, match=f"\\[N, {D}\\]"):
        index.add([7], np.ones((1, D + 1), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index.add([7], np.full((1, D), np.nan, np.float32))
    assert index.ids().tolist() == [1, 2]


def test_hnsw_removes_with_tombstones() -> None:
    db = _mixture(2000, 20)
    index = build_index(D, "HNSW16", np.arange(2000), db, ef_search=64)
    gone = np.arange(0, 2000, 2)
    assert index.remove(gone) == 1000
    assert index.ntotal == 1000 and 0 not in index and 1 in index
    scores, ids = index.search(db[:20], 10)
    assert not np.isin(ids, gone).any()
    assert (ids >= 0).all()  # still k live results: tombstones are skipped inside the graph search
    with pytest.raises(DuplicateIdError, match="rebuilt"):
        index.add([0], db[:1])


def test_ivf_recall_against_exact_search() -> None:
    n, k = 5000, 10
    # 256 clusters over 64 lists: neighbours straddle lists, so nprobe=1 would score ~0.8 here.
    data = _mixture(n + 200, 256, dim=128)  # queries drawn from the same mixture, not indexed
    db, queries = data[:n], data[n:]
    ids = np.arange(n) * 7
    index = VectorIndex(128, "IVF64,Flat", nprobe=16)
    assert index.needs_training
    with pytest.raises(TrainingError, match="train"):
        index.add(ids, db)
    index.train(db)
    assert not index.needs_training
    index.add(ids, db)
    _, got = index.search(queries, k)
    _, want = _exact(db, ids, queries, k)
    recall = np.mean([len(set(g) & set(w)) / k for g, w in zip(got.tolist(), want.tolist(), strict=True)])
    print(f"IVF64,Flat nprobe=16 recall@10 = {recall:.3f} on {n} clustered vectors")
    assert recall >= 0.9
    assert index.remove(ids[:10]) == 10 and index.ntotal == n - 10


def _ivf_flat(db: np.ndarray, ids: np.ndarray, mapped: bool = False) -> faiss.Index:
    """A trained IVF16,Flat holding ``db`` under ``ids``: plain (format 2), or in an IndexIDMap2 (format 1)."""
    ivf = faiss.index_factory(D, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexIDMap2(ivf) if mapped else ivf
    index.train(db)
    index.add_with_ids(db, ids)
    return index


def test_an_ivf_index_holds_its_ids_without_an_id_map(tmp_path: Path) -> None:
    db = _mixture(2000, 16)
    ids = np.arange(2000) * 3 + 11
    index = build_index(D, "IVF16,Flat", ids, db, nprobe=16)  # every list scanned: exact
    assert isinstance(index._index, faiss.IndexIVF)  # no IndexIDMap2 and its id -> position hash map
    gone = ids[100:1900:7]
    assert index.remove(gone) == len(gone)
    kept = np.setdiff1d(ids, gone)
    rows = (kept - 11) // 3
    top = index.search(db[rows[:300]], 3)[1]
    np.testing.assert_array_equal(top[:, 0], kept[:300])  # each kept vector still answers for its own id
    assert not np.isin(index.search(db[:200], 50)[1], gone).any()
    index.add([5], db[:1])
    np.testing.assert_array_equal(index.ids(), np.sort(np.append(kept, 5)))
    path = tmp_path / "ivf.faiss"
    index.save(path, {"model_id": "m"})
    assert isinstance(faiss.read_index(str(path)), faiss.IndexIVFFlat)
    loaded, manifest = VectorIndex.load(path)
    assert manifest["format"] == 2 and manifest["nprobe"] == 16
    np.testing.assert_array_equal(loaded.ids(), index.ids())
    for a, b in zip(loaded.search(db[:50], 10), index.search(db[:50], 10), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.remove([5, 11]) == 2 and 5 not in loaded and 14 in loaded


def _old_snapshot(tmp_path: Path, index: faiss.Index, count: int) -> Path:
    path = tmp_path / "old.faiss"
    manifest = {
        "format": 1,
        "count": count,
        "factory": "IVF16,Flat",
        "dim": D,
        "tombstones": [],
        "nprobe": 16,
    }
    snapshot.write_snapshot(index, path, manifest)
    return path


def test_an_ivf_snapshot_in_the_old_id_map_layout_loads_as_one_holding_its_ids(tmp_path: Path) -> None:
    db = _mixture(1000, 16)
    ids = np.arange(1000) * 5 + 2
    path = _old_snapshot(tmp_path, _ivf_flat(db, ids, mapped=True), 1000)
    loaded, manifest = VectorIndex.load(path)
    assert manifest["format"] == 1 and isinstance(loaded._index, faiss.IndexIVF)
    np.testing.assert_array_equal(loaded.ids(), ids)
    np.testing.assert_array_equal(loaded.search(db[:100], 1)[1][:, 0], ids[:100])
    assert loaded.remove(ids[:10]) == 10
    np.testing.assert_array_equal(loaded.search(db[10:100], 1)[1][:, 0], ids[10:100])
    loaded.save(path, manifest)  # written again in the new layout
    assert VectorIndex.load(path)[1]["format"] == 2
    assert isinstance(faiss.read_index(str(path)), faiss.IndexIVFFlat)


def test_deletes_a_gpu_ivf_index_held_as_tombstones_are_removed_when_its_snapshot_loads(
    tmp_path: Path,
) -> None:
    # A GPU IVF index cannot remove ids: its snapshot (a CPU copy) still holds them, listed as tombstones.
    db = _mixture(500, 16)
    path = tmp_path / "gpu.faiss"
    manifest = {"format": 2, "count": 497, "factory": "IVF16,Flat", "dim": D, "tombstones": [3, 7, 9]}
    snapshot.write_snapshot(_ivf_flat(db, np.arange(500)), path, manifest)
    loaded, _ = VectorIndex.load(path, nprobe=16)
    assert len(loaded) == 497 and not loaded.contains([3, 7, 9]).any()
    assert not np.isin(loaded.search(db[:20], 30)[1], [3, 7, 9]).any()
    assert loaded.save(path, {})["tombstones"] == []  # removed from the index itself, not filtered


def test_an_old_ivf_snapshot_whose_id_map_a_delete_shifted_is_refused(tmp_path: Path) -> None:
    # IndexIDMap2 compacts its id map on remove_ids, the IVF lists keep their positions: the old layout
    # answered for the wrong segments after a delete, and such a snapshot must be rebuilt, not loaded.
    db = _mixture(500, 16)
    old = _ivf_flat(db, np.arange(500), mapped=True)
    old.remove_ids(faiss.IDSelectorBatch(np.arange(10, 20)))
    with pytest.raises(CorruptSnapshotError, match="rebuild"):
        VectorIndex.load(_old_snapshot(tmp_path, old, 490))


def test_training_with_too_few_vectors_suggests_flat() -> None:
    index = VectorIndex(D, "IVF64,Flat")
    with pytest.raises(TrainingError, match="Flat"):
        index.train(_mixture(500, 4))
    with pytest.raises(ValueError, match="nprobe"):
        VectorIndex(D, "Flat", nprobe=4)
    with pytest.raises(ValueError, match="factory"):
        VectorIndex(D, "NoSuchIndex")


def test_training_reads_a_bounded_sample_and_adding_reads_in_chunks() -> None:
    n, dim = 6000, 16
    db = _mixture(n, 64, dim=dim)
    assert VectorIndex(dim, "IVF8,Flat").train_sample_size == 256 * 8  # 256 per list < the 6000 vectors
    assert VectorIndex(dim, "Flat").train_sample_size == 0
    asked: list[np.ndarray] = []

    def read(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        asked.append(ids)
        found = ids[ids % 7 != 3]  # a reader may not have every id (a freed token record)
        return found, db[found]

    index = build_index_from(dim, "IVF8,Flat", np.arange(n), read, chunk=1000)
    train, *chunks = asked
    assert len(train) == len(np.unique(train)) == 2048  # training saw the sample, not all 6000
    assert all(len(c) <= 1000 for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), np.arange(n))
    kept = np.arange(n)[np.arange(n) % 7 != 3]
    np.testing.assert_array_equal(index.ids(), kept)
    index.set_search_params(nprobe=8)  # every list: exact
    queries = _mixture(20, 64, dim=dim, seed=1)
    np.testing.assert_array_equal(index.search(queries, 10)[1], _exact(db[kept], kept, queries, 10)[1])


def test_train_samples_down_to_the_sample_size() -> None:
    big, small = VectorIndex(D, "IVF4,Flat"), VectorIndex(D, "IVF4,Flat")
    db = _mixture(3000, 8)
    assert big.train_sample_size == 1024
    big.train(db)  # 3000 vectors: a sample of 1024 of them is trained on
    rows = np.sort(np.random.default_rng(0).choice(3000, 1024, replace=False))
    small.train(db[rows])
    big.add(np.arange(3000), db)
    small.add(np.arange(3000), db)
    np.testing.assert_array_equal(big.search(db[:50], 5)[1], small.search(db[:50], 5)[1])


def test_loading_a_snapshot_holds_no_second_copy_of_the_file(tmp_path: Path) -> None:
    n = 50_000  # a 6.8 MB file
    path = tmp_path / "index.faiss"
    build_index(D, "Flat", np.arange(n), _mixture(n, 8)).save(path, {"model_id": "m", "last_seq": 1})
    tracemalloc.start()  # numpy's buffers are traced (faiss's own are not): the file read into one was
    try:
        loaded, _ = VectorIndex.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert loaded.ntotal == n
    assert peak < 0.5 * path.stat().st_size, (peak, path.stat().st_size)


def test_snapshot_round_trip(tmp_path: Path) -> None:
    db = _mixture(1000, 16)
    index = build_index(D, "HNSW16", np.arange(1000) + 10, db, ef_search=48)
    index.remove([10, 11])
    path = tmp_path / "index.faiss"
    written = index.save(path, {"model_id": "ViT-B-32:abc", "last_seq": 41})
    loaded, manifest = VectorIndex.load(path)
    assert manifest == json.loads((tmp_path / "index.faiss.manifest.json").read_text()) == written
    assert manifest["model_id"] == "ViT-B-32:abc" and manifest["last_seq"] == 41
    assert (manifest["count"], manifest["factory"], manifest["dim"]) == (998, "HNSW16", D)
    assert manifest["ef_search"] == 48 and len(manifest["sha256"]) == 64
    assert loaded.ntotal == 998 and 10 not in loaded
    np.testing.assert_array_equal(loaded.search(db[:5], 10)[1], index.search(db[:5], 10)[1])
    loaded.save(path, {**manifest, "last_seq": 42})  # a loaded manifest can be passed back
    assert VectorIndex.load(path)[1]["last_seq"] == 42


def _saved(tmp_path: Path, n: int = 50) -> tuple[Path, VectorIndex]:
    index = build_index(D, "Flat", np.arange(n), _mixture(n, 3))
    path = tmp_path / "index.faiss"
    index.save(path, {"model_id": "m", "last_seq": n})
    return path, index


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "bad_manifest"])
def test_damaged_snapshot_raises(tmp_path: Path, damage: str) -> None:
    path, _ = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0x10
        path.write_bytes(bytes(raw))
    elif damage == "no_manifest":
        Path(f"{path}.manifest.json").unlink()
    else:
        Path(f"{path}.manifest.json").write_text("{not json")
    with pytest.raises(CorruptSnapshotError):
        VectorIndex.load(path)


def test_missing_snapshot_is_reported_as_not_found(tmp_path: Path) -> None:
    with pytest.raises(SnapshotNotFoundError):
        VectorIndex.load(tmp_path / "nothing.faiss")


def test_failed_save_keeps_the_previous_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, index = _saved(tmp_path, n=50)
    index.add([1000], _mixture(1, 3, seed=5))

    def crash(fd: int) -> None:
        raise OSError("simulated crash while writing the snapshot")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        index.save(path, {"model_id": "m", "last_seq": 51})
    monkeypatch.undo()
    loaded, manifest = VectorIndex.load(path)
    assert manifest["last_seq"] == 50 and loaded.ntotal == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss", "index.faiss.manifest.json"]


def test_crash_between_renames_recovers_the_new_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, index = _saved(tmp_path, n=50)
    index.add([1000], _mixture(1, 3, seed=5))
    real_replace, calls = os.replace, []

    def replace_then_crash(src: str, dst: str) -> None:
        calls.append(dst)
        if str(dst).endswith(".manifest.json"):
            raise OSError("simulated crash after the index rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="simulated"):
        index.save(path, {"model_id": "m", "last_seq": 51})
    monkeypatch.undo()
    assert len(calls) == 2
    loaded, manifest = VectorIndex.load(path)  # the new index file is paired with its pending manifest
    assert manifest["last_seq"] == 51 and loaded.ntotal == 51 and 1000 in loaded


def test_concurrent_search_while_adding() -> None:
    db = _mixture(2000, 8)
    index = build_index(D, "Flat", np.arange(1000), db[:1000])
    errors: list[BaseException] = []
    done = threading.Event()

    def searcher(batch: int) -> None:
        try:
            while not done.is_set():
                _, ids = index.search(db[:batch], 5)
                assert (ids >= 0).all() and (ids < 2000).all()
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=searcher, args=(b,)) for b in (1, 4)]
    for t in threads:
        t.start()
    for start in range(1000, 2000, 100):
        index.add(np.arange(start, start + 100), db[start : start + 100])
        index.remove([start - 1000])
    done.set()
    for t in threads:
        t.join()
    assert not errors
    assert index.ntotal == 1990


def test_searches_run_between_the_slices_of_a_large_add() -> None:
    db = _mixture(6000, 8)
    index = build_index(D, "HNSW16", np.arange(1000), db[:1000])
    seen: list[int] = []  # live sizes that searches observed while the add ran
    adding = threading.Event()

    def add() -> None:
        adding.set()
        index.add(np.arange(1000, 6000), db[1000:], slice_size=50)  # an HNSW insert: ~0.1 s or more

    thread = threading.Thread(target=add)
    thread.start()
    adding.wait()
    while thread.is_alive():
        _, ids = index.search(db[:1], 5)
        assert (ids >= 0).all()
        seen.append(len(index))
    thread.join()
    assert len(index) == 6000
    partial = [n for n in seen if 1000 < n < 6000]
    assert len(set(partial)) >= 3, seen[:20]  # searches ran between slices, not only before or after


def test_a_live_ivf_pq_add_encodes_outside_the_lock_and_matches_a_plain_add(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = _mixture(4000, 16)
    trained = VectorIndex(D, "IVF16,PQ8x4np", nprobe=4)
    trained.train(db)
    trained.save(tmp_path / "t.faiss", {})
    plain, _ = VectorIndex.load(tmp_path / "t.faiss")
    live, _ = VectorIndex.load(tmp_path / "t.faiss")
    held: list[bool] = []
    encode = VectorIndex._encode

    def spy(self: VectorIndex, x: np.ndarray) -> object:
        held.append(self._lock._writer)
        return encode(self, x)

    monkeypatch.setattr(VectorIndex, "_encode", spy)
    plain.add(np.arange(3000), db[:3000], slice_size=3000)
    assert held == []  # a build's add puts the vectors in whole
    live.add(np.arange(3000), db[:3000])
    assert held == [False]  # a live add encoded the batch before taking the write lock
    assert len(live) == 3000
    for a, b in zip(plain.search(db[3000:3050], 10), live.search(db[3000:3050], 10), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(DuplicateIdError):
        live.add([5, 3500], db[:2])
    assert 3500 not in live


@pytest.mark.parametrize("seconds", [1e-9, 10.0])
def test_a_live_add_sizes_its_slices_by_time_on_one_openmp_thread(
    seconds: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = _mixture(1300, 8)
    index = build_index(D, "HNSW16", np.arange(100), db[:100])
    holds: list[int] = []  # OpenMP threads of the adding thread, once per hold of the write lock
    write = index._lock.write

    def spy() -> object:
        holds.append(faiss.omp_get_max_threads())
        return write()

    monkeypatch.setattr(index._lock, "write", spy)
    monkeypatch.setattr(vector_index, "ADD_SLICE_SECONDS", seconds)
    before = faiss.omp_get_max_threads()
    index.add(np.arange(100, 1300), db[100:])
    assert faiss.omp_get_max_threads() == before  # restored for whatever the caller runs next
    assert set(holds) == {1}
    # HNSW inserts under the lock, so its first slice is one vector; a slice far over its time is followed
    # by slices of one vector, far under, by the largest slices.
    assert len(holds) == (1 + 1199 if seconds < 1 else 2)
    assert len(index) == 1300


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources"), reason="faiss has GPU support here")
def test_to_gpu_without_gpu_support_keeps_the_cpu_index() -> None:
    index = build_index(D, "Flat", [1, 2], _mixture(2, 2))
    assert index.to_gpu() is False
    assert index.device == "cpu" and "faiss has no GPU support" in index.cpu_reason
    assert index.search(_mixture(1, 2), 1)[1][0, 0] in (1, 2)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_a_search_leaves_the_callers_openmp_threads_alone(factory: str) -> None:
    # faiss and torch share one OpenMP runtime, whose thread count is a per-thread setting: a search must
    # not leave the torch ops that follow in the same thread (the service encodes its next queries there)
    # running on fewer cores.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(3)
    try:
        index = build_index(D, factory, np.arange(200), _mixture(200, 4))
        index.set_search_params(threads=1)
        index.search(_mixture(1, 4, seed=1), 5)
        assert faiss.omp_get_max_threads() == 3
    finally:
        faiss.omp_set_num_threads(before)
