"""One writer, many reader processes: index snapshots and the token store never show a reader a torn state."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.token_store import TokenStore
from indexer.vector_index import VectorIndex

pytestmark = pytest.mark.slow  # spawned readers import torch and faiss: 10-20 s on 2 busy cores
READERS = 3
DIM, T = 16, 4
STEP = 25  # vectors added per snapshot version
VERSIONS = 30
RECORDS_PER_SHARD = 8  # small: the writer creates new shard files while the readers read
RECORDS = 240


def _vectors(ids: np.ndarray) -> np.ndarray:
    """A distinct unit vector per id, the same in every process."""
    vecs = np.stack([np.random.default_rng(int(i)).standard_normal(DIM) for i in ids]).astype(np.float32)
    vecs += np.eye(DIM, dtype=np.float32)[ids % DIM] * 4
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def _records(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Values within [-1, 1] (fp16 keeps them to 5e-4), a different pattern per id.
    tokens = np.sin(ids[:, None, None] * 0.37 + np.arange(T * DIM).reshape(1, T, DIM) / 7.0).astype(
        np.float32
    )
    return tokens, tokens[:, 0, :]


def _snapshot_reader(path: str, ready: Any, done: Any, results: Any) -> None:
    ready.set()
    loads, versions, problems = 0, set(), []
    last = False
    while not last:
        last = done.is_set()  # one more load after the writer is done: it must see the final version
        try:
            index, manifest = VectorIndex.load(path)
        except Exception as e:  # what this test is about: a reader must never see a torn snapshot
            problems.append(f"{type(e).__name__}: {e}")
            continue
        loads += 1
        version = int(manifest["version"])
        versions.add(version)
        ids = np.arange(version * STEP)
        if manifest["count"] != len(ids) or not np.array_equal(np.sort(index.ids()), ids):
            problems.append(f"version {version}: {index.ntotal} vectors, not ids 0..{len(ids) - 1}")
            continue
        probe = ids[-STEP:]
        found = index.search(_vectors(probe), 1)[1][:, 0]
        if not np.array_equal(found, probe):
            problems.append(f"version {version}: the newest vectors do not find themselves")
    results.put((loads, sorted(versions), problems[:5], len(problems)))


def _token_reader(root: str, ready: Any, done: Any, results: Any) -> None:
    reads, seen, problems = 0, 0, []
    with TokenStore(Path(root), T, DIM, records_per_shard=RECORDS_PER_SHARD, readonly=True) as store:
        ready.set()
        last = False
        while not last:
            last = done.is_set()  # one more read after the writer is done: it must see every record
            present = np.flatnonzero(store.has(np.arange(RECORDS)))
            if not len(present):
                continue
            try:
                tokens, cls = store.get(present)
            except Exception as e:  # a record `has` reported must read back whole
                problems.append(f"{type(e).__name__}: {e}")
                continue
            want_tokens, want_cls = _records(present)
            if not (np.allclose(tokens, want_tokens, atol=1e-3) and np.allclose(cls, want_cls, atol=1e-3)):
                problems.append(f"wrong content among {len(present)} records")
            reads, seen = reads + 1, max(seen, len(present))
    results.put((reads, seen, problems[:5], len(problems)))


def _run(target: Any, arg: str, write: Any) -> list[tuple[Any, ...]]:
    ctx = mp.get_context("spawn")
    done, results = ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in range(READERS)]
    procs = [ctx.Process(target=target, args=(arg, r, done, results)) for r in readies]
    for proc in procs:
        proc.start()
    try:
        for ready in readies:
            assert ready.wait(120), "a reader process did not start"
        write()
        done.set()
        out = [results.get(timeout=120) for _ in procs]
    finally:
        done.set()
        for proc in procs:
            proc.join(30)
    return out


def test_snapshot_readers_never_see_a_torn_save(tmp_path: Path) -> None:
    path = tmp_path / "index" / "m.faiss"
    index = VectorIndex(DIM)
    index.add(np.arange(STEP), _vectors(np.arange(STEP)))
    index.save(path, {"version": 1})

    def write() -> None:
        for version in range(2, VERSIONS + 1):
            ids = np.arange((version - 1) * STEP, version * STEP)
            index.add(ids, _vectors(ids))
            index.save(path, {"version": version})  # temp file, fsync, rename: the readers race it
            time.sleep(0.02)

    results = _run(_snapshot_reader, str(path), write)
    for loads, versions, problems, n_problems in results:
        assert n_problems == 0, problems
        assert loads > 0 and versions[-1] == VERSIONS, (loads, versions)
    assert sum(len(r[1]) for r in results) > VERSIONS, "the readers loaded versions while the writer saved"


def test_token_store_readers_see_whole_records_while_shards_are_created(tmp_path: Path) -> None:
    writer = TokenStore(tmp_path, T, DIM, records_per_shard=RECORDS_PER_SHARD)

    def write() -> None:
        for start in range(0, RECORDS, 6):
            ids = np.arange(start, min(start + 6, RECORDS))
            writer.put_many(ids, *_records(ids))
            writer.flush()
            time.sleep(0.01)

    try:
        results = _run(_token_reader, str(tmp_path), write)
    finally:
        writer.close()
    for reads, seen, problems, n_problems in results:
        assert n_problems == 0, problems
        assert reads > 1 and seen == RECORDS, (reads, seen)
