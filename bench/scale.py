"""The broad-view index at library scale: Flat, HNSW and IVF-PQ + exact re-scoring over 1M-5M clustered
512-d CLS vectors. Per (size, kind): build time and peak RSS, snapshot bytes and the peak RSS of loading it
(in a fresh child process), one-query search p50/p99 (one OpenMP thread, as the service searches) and
recall@10 against exact search, per search-knob setting; then the p99 of searches while a live index
applies batches of adds, against the p99 without.

Each (size, kind) is built in its own child process, so the RSS figures are its own. Rows go to --out as
they are measured; (size, kind) pairs already there are skipped, so runs can be split or resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.scale_data import (
    DIM,
    EXTRA,
    cpu_name,
    fill_token_store,
    generate,
    ground_truth,
    read_rows,
    rss_mib,
    token_store_dir,
    vectors_path,
)
from indexer.faiss_parts import gpu_unavailable_reason
from indexer.index_build import build_index_from
from indexer.live_index import read_cls
from indexer.token_store import TokenStore
from indexer.vector_index import VectorIndex

K = 10


def factory_of(kind: str, args: argparse.Namespace) -> str:
    return {"flat": "Flat", "hnsw": f"HNSW{args.hnsw_m}", "ivfpq": f"IVF{args.nlist},PQ{args.pq_m}np"}[kind]


def knobs_of(kind: str, args: argparse.Namespace) -> list[dict[str, int]]:
    """Search settings to measure, the first one also in the live-apply test."""
    if kind == "flat":
        return [{"rerank": 0}]
    if kind == "hnsw":
        return [{"ef_search": ef, "rerank": 0} for ef in args.ef_search]
    return [{"nprobe": p, "rerank": r} for p in args.nprobe for r in args.rerank]


class Searcher:
    """One query at a time, as LiveIndex.search does it: the index's top max(k, rerank), re-scored with the
    exact CLS vectors read from the token store (read_cls, checksums and all) when rerank > 0."""

    def __init__(self, index: VectorIndex, store: TokenStore, rerank: int) -> None:
        self.index, self.store, self.rerank = index, store, rerank

    def __call__(self, q: np.ndarray) -> np.ndarray:
        if not self.rerank:
            return self.index.search(q, K)[1][0]
        ids = self.index.search(q, max(K, self.rerank))[1][0]
        kept, vecs = read_cls(self.store, ids[ids >= 0])
        exact = vecs @ q[0]  # the stored vectors are unit length and q is normalised
        return kept[np.argsort(-exact, kind="stable")[:K]]


def time_queries(search: Searcher, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    for q in queries[:20]:
        search(q[None])  # warm-up
    got, times = np.full((len(queries), K), -1, np.int64), []
    for i, q in enumerate(queries):
        start = time.perf_counter()
        row = search(q[None])
        times.append((time.perf_counter() - start) * 1e3)
        got[i, : len(row)] = row
    return got, times


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(t)) / K for g, t in zip(got, truth, strict=True)]))


def live_apply(
    search: Searcher, store: TokenStore, queries: np.ndarray, n: int, args: argparse.Namespace
) -> dict:
    """``--live-runs`` runs of live_apply_once, each adding the next ids; the median run's ratio stands for
    them (the other figures are the median run's too) and every run's ratio is listed."""
    runs = []
    for r in range(args.live_runs):
        runs.append(
            live_apply_once(search, store, queries, n + r * args.apply_batches * args.apply_batch, args)
        )
    runs.sort(key=lambda row: row["p99_ratio"])
    return {**runs[len(runs) // 2], "p99_ratios": [row["p99_ratio"] for row in runs]}


def live_apply_once(
    search: Searcher, store: TokenStore, queries: np.ndarray, first_id: int, args: argparse.Namespace
) -> dict:
    """Search continuously in a thread while this one applies batches of adds the way LiveIndex._apply_add
    does (contains, read_cls, add); p99 of searches that overlapped an apply vs those in quiet windows."""
    stop, log = threading.Event(), []

    def loop() -> None:
        i = 0
        while not stop.is_set():
            start = time.perf_counter()
            search(queries[i % len(queries)][None])
            log.append((start, time.perf_counter()))
            i += 1

    thread = threading.Thread(target=loop)
    thread.start()
    windows, quiet = [], []
    t = time.perf_counter()
    time.sleep(args.quiet_s)
    quiet.append((t, time.perf_counter()))
    for b in range(args.apply_batches):
        ids = np.arange(first_id + b * args.apply_batch, first_id + (b + 1) * args.apply_batch)
        start = time.perf_counter()
        new = ids[~search.index.contains(ids)]
        kept, vecs = read_cls(store, new)
        search.index.add(kept, vecs, slice_size=args.apply_slice)
        windows.append((start, time.perf_counter()))
        t = time.perf_counter()
        time.sleep(args.quiet_s)
        quiet.append((t, time.perf_counter()))
    stop.set()
    thread.join()

    def overlapping(spans: list[tuple[float, float]]) -> list[float]:
        return [(e - s) * 1e3 for s, e in log if any(s < we and e > ws for ws, we in spans)]

    during = overlapping(windows)
    calm = [
        d
        for (s, e), d in zip(log, [(e - s) * 1e3 for s, e in log], strict=True)
        if not any(s < we and e > ws for ws, we in windows) and any(qs <= s and e <= qe for qs, qe in quiet)
    ]
    p99_during, p99_quiet = float(np.percentile(during, 99)), float(np.percentile(calm, 99))
    return {
        "apply_batch": args.apply_batch,
        "apply_batches": args.apply_batches,
        "apply_slice": args.apply_slice or "time",
        "switch_interval_ms": sys.getswitchinterval() * 1e3,
        "apply_ms_p50": round(float(np.median([(e - s) * 1e3 for s, e in windows])), 1),
        "searches_during": len(during),
        "p99_during_ms": round(p99_during, 2),
        "p99_quiet_ms": round(p99_quiet, 2),
        "p99_ratio": round(p99_during / p99_quiet, 2),
    }


def child_build(args: argparse.Namespace) -> None:
    """Build, save, search and live-apply one (size, kind); one JSON row per knob setting on stdout."""
    n, kind = args.sizes[0], args.kinds[0]
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval / 1e3)
    factory = factory_of(kind, args)
    work = args.work_dir
    queries = np.load(work / f"queries-{args.queries}.npy")
    truth = np.load(work / f"truth-{n}-{args.queries}.npy")
    faiss.normalize_L2(queries)
    if kind == "flat":  # a Flat search takes ~0.2 s at 1M: fewer queries
        queries, truth = queries[: args.flat_queries], truth[: args.flat_queries]
    base_rss = rss_mib("VmRSS")
    path = vectors_path(work, n)

    def read(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(ids) and ids[-1] - ids[0] + 1 == len(ids):  # the chunks to add: one row range
            return ids, read_rows(path, int(ids[0]), len(ids))
        return ids, np.concatenate([read_rows(path, int(i), 1) for i in ids])  # the training sample

    train_vectors = min(n, VectorIndex(DIM, factory).train_sample_size)
    start = time.perf_counter()
    index = build_index_from(DIM, factory, np.arange(n), read)
    build_s = time.perf_counter() - start
    build_peak = rss_mib() - base_rss
    snap = work / f"snapshot-{n}-{kind}.faiss"
    index.save(snap, {"bench": "scale"})  # from the CPU, as the service's snapshots are
    if args.index_device != "cpu" and not index.to_gpu(gpu_number(args.index_device)):
        raise SystemExit(f"bench.scale: --index-device {args.index_device}: {index.cpu_reason}")
    store = TokenStore(token_store_dir(work, n), 1, DIM, readonly=True)
    common = {
        "n": n,
        "kind": kind,
        "device": args.index_device,
        "factory": factory,
        "train_vectors": train_vectors,
        "build_s": round(build_s, 1),
        "build_threads": faiss.omp_get_max_threads(),
        "build_peak_rss_mib": round(build_peak),
        "snapshot_mib": round(snap.stat().st_size / 2**20, 1),
        "queries": len(queries),
    }
    for i, knobs in enumerate(knobs_of(kind, args)):
        index.set_search_params(nprobe=knobs.get("nprobe"), ef_search=knobs.get("ef_search"), threads=1)
        search = Searcher(index, store, knobs["rerank"])
        got, times = time_queries(search, queries)
        row = {
            **common,
            "knobs": " ".join(f"{k}={v}" for k, v in knobs.items()),
            "p50_ms": round(float(np.median(times)), 2),
            "p99_ms": round(float(np.percentile(times, 99)), 2),
            "recall@10": round(recall(got, truth), 4),
        }
        if i == 0 and args.apply_batches:
            row.update(live_apply(search, store, queries, n, args))
        print("ROW " + json.dumps(row), flush=True)
    store.close()


def child_load(args: argparse.Namespace) -> None:
    """Load one snapshot in a fresh process: RSS before, peak RSS after (MiB)."""
    snap = args.work_dir / f"snapshot-{args.sizes[0]}-{args.kinds[0]}.faiss"
    # A tiny index of the same kind first: the code pages faiss faults in on its first read are not the index.
    tiny = args.work_dir / f"tiny-{args.kinds[0]}.faiss"
    factory = factory_of(args.kinds[0], args)
    warm = VectorIndex(DIM, "Flat" if "IVF" in factory else factory)
    warm.add([0], np.ones((1, DIM), np.float32))
    warm.save(tiny, {"bench": "warm-up"})
    VectorIndex.load(tiny)
    before = rss_mib("VmRSS")
    start = time.perf_counter()
    index, _ = VectorIndex.load(snap)
    took = time.perf_counter() - start
    peak = rss_mib() - before
    size = snap.stat().st_size / 2**20
    print(
        "ROW "
        + json.dumps(
            {
                "load_s": round(took, 1),
                "load_peak_rss_mib": round(peak),
                "load_x_file": round(peak / size, 2),
                "count": index.ntotal,
            }
        ),
        flush=True,
    )


def run_child(mode: str, n: int, kind: str, argv: list[str]) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "bench.scale", *argv, f"--child={mode}", "--sizes", str(n), "--kinds", kind]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    sys.stderr.write(out.stderr[-2000:])
    return [json.loads(line[4:]) for line in out.stdout.splitlines() if line.startswith("ROW ")]


def gpu_number(device: str) -> int:
    """`cuda` -> 0, `cuda:N` -> N."""
    return int(device.partition(":")[2] or 0)


def markdown(rows: list[dict[str, Any]]) -> str:
    keys = [
        "n",
        "device",
        "factory",
        "knobs",
        "build_s",
        "build_peak_rss_mib",
        "snapshot_mib",
        "load_peak_rss_mib",
        "load_x_file",
        "p50_ms",
        "p99_ms",
        "recall@10",
        "apply_ms_p50",
        "p99_quiet_ms",
        "p99_during_ms",
        "p99_ratio",
        "p99_ratios",
    ]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    words = lambda s: s.split(",")  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=ints, default=[1_000_000], help="library sizes, comma-separated")
    p.add_argument("--kinds", type=words, default=["flat", "hnsw", "ivfpq"], help="of flat,hnsw,ivfpq")
    p.add_argument("--queries", type=int, default=1000, help="one-query searches timed (and recall queries)")
    p.add_argument("--flat-queries", type=int, default=200, help="of those, how many Flat runs (~0.2 s each)")
    p.add_argument("--out", type=Path, default=Path("scale-results.json"), help="rows (read, then extended)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/tvs-scale"), help="vectors, truth, snapshots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-search", type=ints, default=[64, 128])
    p.add_argument("--nlist", type=int, default=4096)
    p.add_argument("--pq-m", type=int, default=64, help="PQ sub-quantizers (bytes per vector)")
    p.add_argument("--nprobe", type=ints, default=[32, 64])
    p.add_argument("--rerank", type=ints, default=[100], help="candidates re-scored exactly (IVF-PQ)")
    p.add_argument("--apply-batch", type=int, default=1000, help="adds per live batch")
    p.add_argument("--apply-batches", type=int, default=5, help="live batches (0: skip the live test)")
    p.add_argument(
        "--live-runs",
        type=int,
        default=1,
        help="live tests one after the other (the median's ratio is reported)",
    )
    p.add_argument(
        "--apply-slice",
        type=int,
        default=None,
        help="adds per hold of the write lock (default: the service's live add, sliced by time)",
    )
    p.add_argument(
        "--switch-interval", type=float, help="ms: the GIL switch interval of the build child (Python's: 5)"
    )
    p.add_argument("--quiet-s", type=float, default=1.0, help="seconds of searching between batches")
    p.add_argument(
        "--index-device",
        default="cpu",
        choices=["cpu", "cuda", *(f"cuda:{n}" for n in range(16))],
        help="where the built index is searched (and the live batches applied): cpu, or a GPU as "
        "TVS_INDEX_DEVICE names it (faiss-gpu; fp16 storage); the snapshot is saved and loaded on the CPU",
    )
    p.add_argument("--child", choices=["build", "load"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.live_runs * args.apply_batches * args.apply_batch > EXTRA:
        p.error(f"--live-runs x --apply-batches x --apply-batch must be <= {EXTRA} (the vectors beyond N)")
    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--child")]
    return args, passed


def main() -> None:
    args, argv = parse()
    if args.child == "build":
        return child_build(args)
    if args.child == "load":
        return child_load(args)
    rows: list[dict[str, Any]] = json.loads(args.out.read_text()) if args.out.exists() else []
    if args.index_device != "cpu" and (reason := gpu_unavailable_reason(gpu_number(args.index_device))):
        print(f"bench.scale: --index-device {args.index_device}: {reason}", file=sys.stderr)
        raise SystemExit(2)
    done = {(r["n"], r["kind"], r.get("device", "cpu")) for r in rows}
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, faiss {faiss.__version__}, load average {os.getloadavg()}")
    for n in args.sizes:
        todo = [kind for kind in args.kinds if (n, kind, args.index_device) not in done]
        if not todo:
            continue
        t = time.perf_counter()
        generate(args.work_dir, n, args.queries, args.seed)
        ground_truth(args.work_dir, n, np.load(args.work_dir / f"queries-{args.queries}.npy"))
        fill_token_store(args.work_dir, n)
        print(
            f"n={n}: data, exact top-10 and token store ready in {time.perf_counter() - t:.0f} s", flush=True
        )
        for kind in todo:
            built = run_child("build", n, kind, argv)
            loaded = run_child("load", n, kind, argv)[0]
            for row in built:
                row.update(loaded)
                print(json.dumps(row), flush=True)
            rows += built
            args.out.write_text(json.dumps(rows, indent=1))
            (args.work_dir / f"snapshot-{n}-{kind}.faiss").unlink(missing_ok=True)
    print(f"load average {os.getloadavg()}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
