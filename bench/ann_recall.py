"""Benchmark FAISS factories on clustered 512-d vectors: build time, latency, recall@10 vs exact, memory."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from indexer.index_build import build_index
from indexer.vector_index import VectorIndex

logger = logging.getLogger(__name__)


def clustered(n: int, dim: int, clusters: int, rng: np.random.Generator, latent: int = 32) -> np.ndarray:
    """Unit vectors shaped like CLIP embeddings: a shared direction (anisotropy), overlapping Gaussian
    clusters on a low-dimensional subspace (a continuum of near neighbours) and isotropic noise.
    Nearest-neighbour cosine ~0.74, 10th ~0.69, a random pair ~0.37."""

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    common = unit(rng.standard_normal((1, dim)))
    basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T  # [latent, dim], orthonormal rows
    centres = rng.standard_normal((clusters, latent))
    z = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, latent))
    return unit(0.6 * common + 0.7 * unit(z @ basis) + 0.35 * unit(rng.standard_normal((n, dim))))


def median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def configs(n: int) -> list[tuple[str, list[dict[str, int]]]]:
    """(factory, search-param variants) per library size; Flat first."""
    nlists = [64, 128] if n <= 20_000 else [256, 1024]
    out: list[tuple[str, list[dict[str, int]]]] = [("Flat", [{}])]
    out.append(("HNSW32", [{"ef_search": ef} for ef in (16, 32, 64, 128)]))
    for nlist in nlists:
        out.append((f"IVF{nlist},Flat", [{"nprobe": p} for p in (4, 8, 16, 32, 64) if p <= nlist // 2]))
    return out


def measure(index: VectorIndex, queries: np.ndarray, batch: int, k: int) -> tuple[np.ndarray, float, float]:
    """(top-k ids of all queries, single-query p50 ms, batch p50 ms)."""
    _, got = index.search(queries, k)
    order = iter(np.tile(np.arange(len(queries)), 2))
    single = median_ms(lambda: index.search(queries[next(order)], k), len(queries) - 20, warmup=20)
    batch_ms = median_ms(lambda: index.search(queries[:batch], k), repeats=7, warmup=2)
    return got, single, batch_ms


def run_size(
    n: int,
    dim: int,
    n_queries: int,
    batch: int,
    k: int,
    seed: int,
    threads: int,
    vectors: np.ndarray | None = None,
) -> list[dict[str, object]]:
    if vectors is None:
        data = clustered(n + n_queries, dim, clusters=max(64, n // 100), rng=np.random.default_rng(seed))
    else:  # real embeddings: the last rows are the queries
        data = np.ascontiguousarray(vectors[: n + n_queries], dtype=np.float32)
        n = len(data) - n_queries
    db, queries = data[:n], data[n:]
    rows: list[dict[str, object]] = []
    truth = np.zeros(0)
    flat_single = flat_batch = float("nan")
    for factory, variants in configs(n):
        start = time.perf_counter()
        index = build_index(dim, factory, np.arange(n), db, threads=threads)
        build_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            index.save(Path(tmp) / "index.faiss", {"bench": True})
            bytes_per_vec = (Path(tmp) / "index.faiss").stat().st_size / n
        for params in variants:
            if params:
                index.set_search_params(**params)
            got, single, batch_ms = measure(index, queries, batch, k)
            if factory == "Flat":  # first in the list: its results are the exact top-k
                truth, flat_single, flat_batch = got, single, batch_ms
            recall = np.mean([np.intersect1d(g, t).size / k for g, t in zip(got, truth, strict=True)])
            rows.append(
                {
                    "n": n,
                    "index": factory + "".join(f" {key}={value}" for key, value in params.items()),
                    "build_s": round(build_s, 2),
                    "single_p50_ms": round(single, 3),
                    f"batch{batch}_ms": round(batch_ms, 2),
                    "recall@10": round(float(recall), 4),
                    "bytes_per_vec": round(bytes_per_vec, 1),
                    "single_x_flat": round(flat_single / single, 1),
                    "batch_x_flat": round(flat_batch / batch_ms, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[key]) for key in keys) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=300, help="single queries timed (and recall queries)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads per search call")
    parser.add_argument(
        "--vectors", type=Path, help="an .npy [N, D] of real CLS vectors instead of synthetic"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    vectors = np.load(args.vectors, mmap_mode="r") if args.vectors is not None else None
    dim = vectors.shape[1] if vectors is not None else args.dim
    print(
        f"load average {os.getloadavg()}; faiss threads per search {args.threads}; "
        f"torch threads {torch.get_num_threads()} (batched Flat)",
        flush=True,
    )
    rows = []
    for n in args.sizes:
        rows += run_size(n, dim, args.queries, args.batch, args.k, args.seed, args.threads, vectors)
    print(markdown(rows))
    print(f"load average {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
