"""Capacity figures: bytes per vector, RAM, single-query latency and recall of FAISS factories, token-store size.

Builds each index in ``IndexIDMap2`` over ``index_factory(d, f, METRIC_INNER_PRODUCT)`` on L2-normalised
vectors (the service does so for Flat, HNSW and the other non-IVF factories; an IVF index keeps the ids in
its lists there, without the wrapper's 8 B a vector on disk and ~48 B in RAM) over clustered synthetic
vectors, then prints one table row per factory:

- ``B/vec``: serialized bytes / vectors at N (what ``index/<model>.faiss`` weighs on disk);
- ``marg B/vec``: (bytes at N - bytes at N/2) / (N/2), the per-vector slope without fixed costs
  (centroids, codebooks), which is what extrapolates to 10M or 100M vectors;
- ``RAM marg``: resident memory of a fresh process that loads the snapshot, as the same slope between N/2
  and N (counts what the file does not hold, e.g. the id -> position hash map that ``IndexIDMap2``
  rebuilds on load);
- ``p50/p99 ms``: one query at a time, one OpenMP thread (as the service searches a single query);
- ``R@k``: recall of the exact top-k (a Flat search over the same vectors);
- ``scan ns``: for the flat encodings (Flat, SQ8, PQ…), p50 / N: what scanning one stored vector of that
  encoding costs, behind the estimate ``t ~ t_coarse + nprobe * N / nlist * scan`` for IVF at any scale;
- ``R@k resc``: recall when the index returns 4k candidates that are re-scored with their exact vectors
  (the token store keeps every segment's CLS, so a compressed index can be re-scored at k extra reads).

IVF factories with the same ``nlist`` share one k-means (the coarse centroids are trained once), so the
``build s`` of the first one includes it and the others do not.

Run: ``python bench/capacity.py`` (defaults: 50k vectors, D=512, a few minutes on 2 shared cores), or
``--n 20000 --factories Flat,SQ8`` for a quick look. ``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

logger = logging.getLogger(__name__)

# "np": no polysemous training, which the factory otherwise runs for PQ codes; the service never searches by
# Hamming distance, and that training alone takes ~10 minutes for PQ64 on a 2-core machine (docs/deploy.md).
DEFAULT_FACTORIES = "Flat,SQ8,PQ64np,HNSW32,IVF1024,SQ8,IVF1024,PQ64np"
RERANK_FACTOR = 4
TOKEN_HEADER_BYTES = 32  # indexer/token_store.py: magic, flags, segment id, crc32, padding
TOKEN_RECORD_ALIGN = 64
SHARD_HEADER_BYTES = 4096
RECORDS_PER_SHARD = 4096

# Run in a fresh interpreter so that memory freed by earlier builds cannot hide the growth.
_RSS_PROBE = """
import sys, faiss
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * {page}
before = rss()
index = faiss.read_index(sys.argv[1])
print(rss() - before)
"""


@dataclass
class Row:
    factory: str
    params: str
    n: int
    build_s: float
    bytes_per_vec: float
    marginal_bytes_per_vec: float
    ram_bytes_per_vec: float | None
    p50_ms: float
    p99_ms: float
    recall: float
    recall_rescored: float
    scan_ns_per_vec: float | None


def split_factories(spec: str) -> list[str]:
    """'Flat,SQ8,IVF1024,PQ64' -> ['Flat', 'SQ8', 'IVF1024,PQ64']: an 'IVF…'/'OPQ…' part joins the next one."""
    parts, out, pending = [p.strip() for p in spec.split(",") if p.strip()], [], ""
    for p in parts:
        if p.startswith(("IVF", "OPQ", "PCA")):
            pending = f"{pending},{p}" if pending else p
            continue
        out.append(f"{pending},{p}" if pending else p)
        pending = ""
    if pending:
        raise SystemExit(
            f"factory list ends with {pending!r}: an IVF/OPQ/PCA prefix needs an encoding after it"
        )
    return out


def clustered(n: int, d: int, clusters: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors around random centres (cosine to their centre ~ 1/sqrt(1 + spread^2)), like CLIP's clumps."""
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 20000):  # bounded temporaries
        m = min(20000, n - start)
        noise = rng.standard_normal((m, d), dtype=np.float32) * (spread / math.sqrt(d))
        out[start : start + m] = centres[rng.integers(0, clusters, m)] + noise
    faiss.normalize_L2(out)
    return out


def near_database(xb: np.ndarray, count: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Queries: database points moved by fresh noise, so each has real near neighbours (not exact copies)."""
    picks = xb[rng.integers(0, len(xb), count)]
    noise = rng.standard_normal(picks.shape, dtype=np.float32) * (spread / math.sqrt(xb.shape[1]))
    q = picks + noise
    faiss.normalize_L2(q)
    return q


def configure(index: faiss.Index, nprobe: int, ef_search: int) -> str:
    params = []
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(nprobe, ivf.nlist)
        params.append(f"nprobe={ivf.nprobe}")
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexHNSW):
        base.hnsw.efSearch = ef_search
        params.append(f"efSearch={ef_search}")
    return " ".join(params) or "-"


def loaded_rss(snapshot: np.ndarray, workdir: Path) -> int | None:
    """Bytes of resident memory a fresh process gains by loading this serialized index."""
    path = workdir / "probe.faiss"
    snapshot.tofile(path)
    code = _RSS_PROBE.format(page=os.sysconf("SC_PAGE_SIZE"))
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True, timeout=300
        )
        return int(out.stdout.strip())
    except (subprocess.SubprocessError, ValueError) as e:
        logger.warning("RAM probe failed: %s", e)
        return None
    finally:
        path.unlink(missing_ok=True)


def latency_ms(index: faiss.Index, queries: np.ndarray, k: int) -> np.ndarray:
    for q in queries[:10]:  # warm-up
        index.search(q[None], k)
    times = np.empty(len(queries))
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        index.search(q[None], k)
        times[i] = (time.perf_counter() - t0) * 1e3
    return times


def bench_factory(
    factory: str,
    xb: np.ndarray,
    xq: np.ndarray,
    truth: np.ndarray,
    args: argparse.Namespace,
    workdir: Path,
    centroids: dict[int, np.ndarray],
) -> Row:
    n, d = xb.shape
    faiss.omp_set_num_threads(args.build_threads)
    t0 = time.perf_counter()
    index = faiss.IndexIDMap2(faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT))
    ivf = faiss.try_extract_index_ivf(index.index)
    if ivf is not None and ivf.nlist in centroids:
        ivf.quantizer.add(centroids[ivf.nlist])  # a full quantizer is not retrained by IndexIVF.train
    if not index.is_trained:
        train = xb[: args.train] if args.train else xb
        index.train(train)
    if ivf is not None and ivf.nlist not in centroids:
        centroids[ivf.nlist] = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    ids = np.arange(n, dtype=np.int64) * 3 + 1  # sparse ids, as catalog row ids are after deletes
    half = n // 2
    index.add_with_ids(xb[:half], ids[:half])
    snap_half = faiss.serialize_index(index)
    index.add_with_ids(xb[half:], ids[half:])
    build_s = time.perf_counter() - t0
    snap_full = faiss.serialize_index(index)
    bytes_half, bytes_full = snap_half.nbytes, snap_full.nbytes
    ram = None
    if not args.no_ram:
        rss_half, rss_full = loaded_rss(snap_half, workdir), loaded_rss(snap_full, workdir)
        if rss_half is not None and rss_full is not None:
            ram = (rss_full - rss_half) / (n - half)
    del snap_half, snap_full
    params = configure(index.index, args.nprobe, args.ef_search)
    faiss.omp_set_num_threads(args.threads)
    times = latency_ms(index, xq, args.k)
    # A flat code array is scanned whole by every query: its time per vector is the cost of one stored
    # code in this encoding, which an IVF list of the same encoding pays per vector it holds.
    flat_codes = isinstance(faiss.downcast_index(index.index), faiss.IndexFlatCodes)
    scan = float(np.median(times)) * 1e6 / n if flat_codes else None
    _, found = index.search(xq, args.k)
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, ids[truth], strict=True))
    _, wide = index.search(xq, args.k * RERANK_FACTOR)
    rescored_hits = 0
    for q, cand, t in zip(xq, wide, truth, strict=True):
        pos = (cand[cand >= 0] - 1) // 3  # id -> row
        best = pos[np.argsort(-(xb[pos] @ q))[: args.k]]
        rescored_hits += len(np.intersect1d(best, t))
    return Row(
        factory=factory,
        params=params,
        n=n,
        build_s=build_s,
        bytes_per_vec=bytes_full / n,
        marginal_bytes_per_vec=(bytes_full - bytes_half) / (n - half),
        ram_bytes_per_vec=ram,
        p50_ms=float(np.percentile(times, 50)),
        p99_ms=float(np.percentile(times, 99)),
        recall=hits / truth.size,
        recall_rescored=rescored_hits / truth.size,
        scan_ns_per_vec=scan,
    )


def token_record_bytes(num_frames: int, dim: int) -> int:
    """Bytes of one token-store record: header + fp16 [T, D] tokens + fp16 [D] CLS, rounded up to 64."""
    raw = TOKEN_HEADER_BYTES + num_frames * dim * 2 + dim * 2
    return -(-raw // TOKEN_RECORD_ALIGN) * TOKEN_RECORD_ALIGN


def measured_token_bytes(num_frames: int, dim: int, workdir: Path) -> float | None:
    """Allocated bytes per record after writing one full shard with the project's TokenStore, if importable."""
    try:
        from indexer.token_store import TokenStore
    except ImportError as e:  # run from outside the checkout, or the module moved
        logger.info("token store not importable (%s); using the formula only", e)
        return None
    root = workdir / "tokens"
    store = TokenStore(root, num_frames=num_frames, dim=dim, records_per_shard=RECORDS_PER_SHARD)
    try:
        rng = np.random.default_rng(0)
        for start in range(0, RECORDS_PER_SHARD, 512):
            ids = np.arange(start, start + 512)
            tok = rng.standard_normal((512, num_frames, dim), dtype=np.float32).astype(np.float16)
            store.put_many(ids, tok, tok[:, 0])
        store.flush()
    finally:
        store.close()
    allocated = sum(p.stat().st_blocks * 512 for p in root.glob("*") if p.is_file())
    return allocated / RECORDS_PER_SHARD


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_simd() -> str:
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return "?"
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]
    return ",".join(f for f in wanted if f in flags) or "none of avx2/avx512"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=50_000, help="database vectors (default 50000)")
    parser.add_argument("--d", type=int, default=512, help="dimension (ViT-B CLS: 512)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (the broad view's top-k)")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=0.7, help="noise norm around a cluster centre")
    parser.add_argument("--factories", default=DEFAULT_FACTORIES)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--train", type=int, default=0, help="training vectors (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads while searching")
    parser.add_argument(
        "--build-threads",
        type=int,
        default=1,
        help="OpenMP threads while training/adding (1: see docs/deploy.md)",
    )
    parser.add_argument("--frames", type=int, default=12, help="T frames per segment in the token store")
    parser.add_argument("--no-ram", action="store_true", help="skip the per-index RAM probe subprocess")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the rows and the machine to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    factories = split_factories(args.factories)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    xb = clustered(args.n, args.d, args.clusters, args.spread, rng)
    xq = near_database(xb, args.queries, args.spread, rng)
    exact = faiss.IndexFlatIP(args.d)
    exact.add(xb)
    _, truth = exact.search(xq, args.k)
    del exact
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = (
        f"{cpu_name()}, {os.cpu_count()} cores, SIMD {cpu_simd()}, load avg {load}; faiss {faiss.__version__} "
        f"({faiss.get_compile_options().strip()}), numpy {np.__version__}, Python {platform.python_version()}"
    )
    print(f"# machine: {machine}")
    print(
        f"# data: {args.n} x {args.d} clustered unit vectors ({args.clusters} clusters, spread {args.spread}), "
        f"{args.queries} queries, k={args.k}, search threads={args.threads}; data made in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    header = (
        f"{'factory':<16} {'params':<12} {'build s':>8} {'B/vec':>8} {'marg B/vec':>10} {'RAM marg':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'scan ns':>7} {f'R@{args.k}':>6} {'R resc':>6}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    centroids: dict[int, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="tvs-capacity-") as tmp:
        for factory in factories:
            row = bench_factory(factory, xb, xq, truth, args, Path(tmp), centroids)
            rows.append(row)
            ram = f"{row.ram_bytes_per_vec:9.0f}" if row.ram_bytes_per_vec is not None else f"{'-':>9}"
            scan = f"{row.scan_ns_per_vec:7.1f}" if row.scan_ns_per_vec is not None else f"{'-':>7}"
            print(
                f"{row.factory:<16} {row.params:<12} {row.build_s:8.1f} {row.bytes_per_vec:8.1f} "
                f"{row.marginal_bytes_per_vec:10.1f} {ram} {row.p50_ms:8.3f} {row.p99_ms:8.3f} {scan} "
                f"{row.recall:6.3f} {row.recall_rescored:6.3f}",
                flush=True,
            )
        record = token_record_bytes(args.frames, args.d)
        per_segment = record + SHARD_HEADER_BYTES / RECORDS_PER_SHARD
        measured = measured_token_bytes(args.frames, args.d, Path(tmp))
    print(
        f"\n# token store, T={args.frames} D={args.d} fp16: record = ceil64({TOKEN_HEADER_BYTES} + "
        f"{args.frames}*{args.d}*2 + {args.d}*2) = {record} B; + shard header {SHARD_HEADER_BYTES}/"
        f"{RECORDS_PER_SHARD} = {per_segment:.0f} B/segment -> {1e9 / per_segment:,.0f} segments per GB "
        f"({2**30 / per_segment:,.0f} per GiB)"
    )
    if measured is not None:
        print(f"# token store measured: {measured:.0f} B allocated per record (one full shard written)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "rows": [asdict(r) for r in rows],
                    "token_record_bytes": record,
                    "token_bytes_per_segment": per_segment,
                    "token_bytes_measured": measured,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
