"""Exact re-scoring of an approximate top-k: from the token store's CLS vs FAISS's IndexRefineFlat.

One IVF-PQ index over N clustered vectors, single queries, one OpenMP thread. Re-scoring from the token
store searches the pool (k · factor), reads the pool's records (the live path: `read_cls`, checksums and
all) and ranks by exact cosine; IndexRefineFlat does the same from a float32 copy it keeps in RAM.
Prints latency (median per query), R@10 against exact search, and bytes per vector of each index.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from bench.ann_recall import clustered
from indexer.live_index import read_cls
from indexer.token_store import TokenStore


def _bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).size)


def _recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--factory", default="IVF256,PQ32np")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--train", type=int, default=20_000, help="training vectors (a sample)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--pool", type=int, default=40, help="candidates re-scored (k_factor = pool / 10)")
    parser.add_argument("--frames", type=int, default=12, help="T of the token store's records")
    parser.add_argument(
        "--store-records", type=int, default=20_000, help="records written (ids are read modulo this)"
    )
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    db = clustered(args.n, args.dim, 1000, rng)
    q = clustered(args.queries, args.dim, 1000, np.random.default_rng(1))
    k = 10
    _, truth = faiss.knn(q, db, k, faiss.METRIC_INNER_PRODUCT)

    t = time.perf_counter()
    base = faiss.index_factory(args.dim, args.factory, faiss.METRIC_INNER_PRODUCT)
    base.train(db[: args.train])
    faiss.extract_index_ivf(base).nprobe = args.nprobe
    refine = faiss.IndexRefineFlat(base)  # wraps the trained, empty base
    refine.add(db)  # into both: the codes, and the float32 copy it re-scores from
    refine.k_factor = args.pool / k
    print(f"built {args.factory} + RFlat on {args.n} x {args.dim} in {time.perf_counter() - t:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        store = TokenStore(Path(tmp) / "tokens", args.frames, args.dim)
        for start in range(0, args.store_records, 4096):
            ids = np.arange(start, min(start + 4096, args.store_records))
            store.put_many(ids, np.zeros((len(ids), args.frames, args.dim), np.float16), db[ids])
        store.flush()
        store.close()
        reader = TokenStore(Path(tmp) / "tokens", args.frames, args.dim, readonly=True)

        def plain(x: np.ndarray) -> np.ndarray:
            return base.search(x, k)[1][0]

        def refined(x: np.ndarray) -> np.ndarray:
            return refine.search(x, k)[1][0]

        def from_store(x: np.ndarray) -> np.ndarray:
            _, ids = base.search(x, args.pool)
            pool = ids[0][ids[0] >= 0]
            kept, vecs = read_cls(reader, pool % args.store_records)  # the read the live path does
            exact = db[pool] @ x[0]  # ranked by the true vectors (the store holds their fp16 copies)
            assert len(kept) == len(pool) and vecs.shape == (len(pool), args.dim)
            return pool[np.argsort(-exact, kind="stable")[:k]]

        rows = []
        for name, fn in (("IVF-PQ alone", plain), ("IndexRefineFlat", refined), ("token store", from_store)):
            for i in range(20):
                fn(q[i : i + 1])  # warm-up (and the store's pages into the page cache)
            times, got = [], []
            for i in range(args.queries):
                t = time.perf_counter()
                got.append(fn(q[i : i + 1]))
                times.append((time.perf_counter() - t) * 1000)
            rows.append((name, statistics.median(times), _recall(np.array(got), truth)))
        reader.close()

    code_bytes = _bytes(base) / args.n
    refine_bytes = code_bytes + _bytes(refine.refine_index) / args.n
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    print(f"{cpu}, faiss {faiss.__version__}, {args.queries} single queries, k={k}, pool {args.pool}")
    print("| method | median ms/query | R@10 | index B/vec (RAM) |")
    print("|---|---|---|---|")
    for name, ms, recall in rows:
        size = refine_bytes if name == "IndexRefineFlat" else code_bytes
        print(f"| {name} | {ms:.3f} | {recall:.3f} | {size:.0f} |")


if __name__ == "__main__":
    main()
