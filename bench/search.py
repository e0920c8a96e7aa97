"""Benchmark the two-stage search: per-stage p50/p99 in-process and over HTTP, and micro-batching throughput.

Builds a synthetic library per size N (Gaussian-mixture CLS vectors and frame tokens in a real catalog,
token store and FAISS snapshot), loads a random-weight ViT-B-32 TokenBinder, and measures in one run:
text encoding alone, two-stage search and broad-only search (one query at a time), FAISS recall@10 of
the chosen factory against exact search, and throughput with C concurrent clients, batching on vs off.
`--backend milvus` also copies each library into a Milvus collection (`--milvus-uri`, default Milvus Lite
in the output folder; `--milvus-index`, default FLAT) and measures the same one-query runs on it, beside
FAISS, in the same run.

    .venv/bin/python bench/search.py --sizes 10000,100000 --factory HNSW32 --ef-search 64
    .venv/bin/python bench/search.py --sizes 100000 --factory Flat --backend milvus --no-http
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from serving import start_uvicorn
from sqlalchemy import insert

from app.search_types import SearchQuery
from app.searcher import Searcher
from indexer import catalog
from indexer.catalog import Segment, Video
from indexer.db import make_engine, make_session_factory, session_scope, upgrade_database
from indexer.index_build import build_index
from indexer.live_index import LiveIndex
from indexer.milvus_index import MilvusIndex
from indexer.milvus_schema import MilvusConfig, parse_index_spec
from indexer.milvus_sync import rebuild
from indexer.paths import DataDir
from indexer.token_store import TokenStore
from model.checkpoint import load_model
from model.inference import prepare_for_inference
from model.openmp import release_openmp_threads

logger = logging.getLogger(__name__)

WORDS = "a man woman dog red blue car runs jumps kitchen street beach ball plays cooks under the sun at night".split()
SEGMENTS_PER_VIDEO = 10


def queries(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 14)))) for _ in range(n)]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class Mixture:
    """Clustered unit vectors like CLIP embeddings: a shared direction, Gaussian clusters, noise."""

    def __init__(self, dim: int, clusters: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.common = unit(rng.standard_normal(dim))
        self.centers = unit(rng.standard_normal((clusters, dim)))
        self.dim = dim

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        pick = rng.integers(0, len(self.centers), n)
        return unit(0.6 * self.common + self.centers[pick] + 0.45 * unit(rng.standard_normal((n, self.dim))))


def build_library(root: Path, n: int, model: Any, args: argparse.Namespace) -> tuple[str, np.ndarray]:
    """Catalog rows, token records and a FAISS snapshot for n segments; returns (db url, CLS [n, D])."""
    data = DataDir(root).ensure()
    url = data.database_url
    upgrade_database(url)
    cfg = model.config
    factory = make_session_factory(make_engine(url))
    with session_scope(factory) as session:
        catalog.ensure_model(session, model.model_id, cfg.backbone, cfg.embed_dim, cfg.num_frames)
        catalog.activate_model(session, model.model_id)
        n_videos = -(-n // SEGMENTS_PER_VIDEO)
        session.execute(
            insert(Video),
            [
                dict(sha256=hashlib.sha256(str(v).encode()).hexdigest(), source=f"bench://{v}", title=f"video {v}",
                     status="ready", duration_s=150.0, meta={})
                for v in range(1, n_videos + 1)
            ],
        )  # fmt: skip
        session.execute(
            insert(Segment),
            [
                dict(id=i, video_id=(i - 1) // SEGMENTS_PER_VIDEO + 1, ordinal=(i - 1) % SEGMENTS_PER_VIDEO,
                     start_s=15.0 * ((i - 1) % SEGMENTS_PER_VIDEO), end_s=15.0 * ((i - 1) % SEGMENTS_PER_VIDEO + 1),
                     model_id=model.model_id)
                for i in range(1, n + 1)
            ],
        )  # fmt: skip
    mix, rng = Mixture(cfg.embed_dim, args.clusters, args.seed), np.random.default_rng(args.seed + 1)
    all_cls = np.zeros((n, cfg.embed_dim), np.float32)
    with TokenStore(data.tokens_dir(model.model_id), cfg.num_frames, cfg.embed_dim) as store:
        for start in range(0, n, 4096):
            m = min(4096, n - start)
            base = mix.sample(m, rng)
            frames = unit(
                base[:, None] + 0.35 * unit(rng.standard_normal((m, cfg.num_frames, cfg.embed_dim)))
            )
            cls = unit(frames.mean(axis=1))
            store.put_many(np.arange(start + 1, start + m + 1), frames, cls)
            all_cls[start : start + m] = cls
        store.flush()
    params = {"ef_search": args.ef_search} if "HNSW" in args.factory else {}
    if "IVF" in args.factory:
        params = {"nprobe": args.nprobe}
    index = build_index(cfg.embed_dim, args.factory, np.arange(1, n + 1), all_cls, **params)
    # The snapshot carries the search parameters, so every process that loads it searches the same way.
    index.save(data.index_path(model.model_id), {"model_id": model.model_id, "last_seq": 0})
    return url, all_cls


def recall_at_10(live: LiveIndex | MilvusIndex, cls: np.ndarray, args: argparse.Namespace) -> float:
    rng = np.random.default_rng(args.seed + 2)
    q = Mixture(cls.shape[1], args.clusters, args.seed).sample(200, rng)
    exact = torch.topk(torch.from_numpy(q) @ torch.from_numpy(cls).T, 10, dim=1).indices.numpy() + 1
    _, got = live.search(q, 10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got, strict=True)]))


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else float("nan")


def in_process(
    model: Any, live: LiveIndex | MilvusIndex, url: str, texts: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    searcher = Searcher(model, live, make_session_factory(make_engine(url)))
    searcher.warm_up()
    samples: dict[str, list[float]] = {}
    for n, text in enumerate(texts[: args.warmup + args.queries]):
        # Interleaved, so a change of load on a shared machine hits every variant alike.
        t = time.perf_counter()
        with torch.inference_mode():
            model.encode_queries([text])
        encode_alone = (time.perf_counter() - t) * 1000
        runs = {}
        for name, rerank in (("two_stage", True), ("broad_only", False)):
            t = time.perf_counter()
            out = searcher.search_batch([SearchQuery(text, limit=10, rerank=rerank)])[0]
            runs[name] = ((time.perf_counter() - t) * 1000, out.timings_ms)
        if n < args.warmup:
            continue
        samples.setdefault("encode_alone", []).append(encode_alone)
        for name, (wall, timings) in runs.items():
            samples.setdefault(f"{name}.wall", []).append(wall)
            for stage, ms in timings.items():
                samples.setdefault(f"{name}.{stage}", []).append(ms)
    return {k: (pct(v, 50), pct(v, 99)) for k, v in samples.items()}


async def throughput(searcher: Searcher, texts: list[str], clients: int, total: int) -> float:
    await searcher.start()
    try:
        per = total // clients

        async def client(c: int) -> None:
            for i in range(per):
                await searcher.search(SearchQuery(texts[(c * per + i) % len(texts)]))

        await asyncio.gather(*(client(c) for c in range(2)))  # warm-up
        t = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        return per * clients / (time.perf_counter() - t)
    finally:
        await searcher.stop()


def serve(
    root: Path, url: str, args: argparse.Namespace, batch: int, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "TVS_DATA_DIR": str(root), "TVS_DATABASE_URL": url, "TVS_MODEL": args.model,
           "TVS_WORKER": "false", "TVS_INDEX_FACTORY": args.factory, "TVS_BATCH_MAX_SIZE": str(batch),
           "TVS_BATCH_MAX_WAIT_MS": str(args.batch_wait_ms), "TVS_PRECISION": args.precision}  # fmt: skip
    if args.threads:
        env["TVS_TORCH_THREADS"] = str(args.threads)
    return start_uvicorn(env, log, port=args.port)


async def http_run(
    base: str, texts: list[str], clients: int, total: int, rerank: bool = True
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as http:
        walls: list[float] = []
        stages: dict[str, list[float]] = {}
        per = max(1, total // clients)

        async def client(c: int) -> None:
            for i in range(per):
                t = time.perf_counter()
                r = await http.post(
                    "/search", json={"query": texts[(c * per + i) % len(texts)], "rerank": rerank}
                )
                walls.append((time.perf_counter() - t) * 1000)
                body = r.raise_for_status().json()
                for stage, ms in body["timings_ms"].items():
                    stages.setdefault(stage, []).append(ms)
                stages.setdefault("batch_size", []).append(body["batch_size"])

        await asyncio.gather(*(client(c) for c in range(min(clients, 2))))  # warm-up
        walls.clear()
        stages.clear()
        t = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - t
    return {"qps": per * clients / elapsed, "wall": (pct(walls, 50), pct(walls, 99)),
            **{s: (pct(v, 50), pct(v, 99)) for s, v in stages.items()}}  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_size(n: int, model: Any, texts: list[str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    root = out / f"n{n}"
    t = time.perf_counter()
    url, cls = build_library(root, n, model, args)
    result: dict[str, Any] = {"n": n, "build_s": time.perf_counter() - t}
    live = LiveIndex(DataDir(root), make_session_factory(make_engine(url)), model.model_id, model.config.embed_dim,
                     model.config.num_frames, factory=args.factory).open(follow=False)  # fmt: skip
    result["index"] = {"factory": live.factory, "size": live.size, "recall@10": recall_at_10(live, cls, args)}
    result["in_process"] = in_process(model, live, url, texts, args)
    if args.backend == "milvus":
        result["milvus"] = run_milvus(root, url, model, cls, texts, args)
    # The single queries ran in this thread; from here the batch threads search. Give this thread's
    # OpenMP pool back, as the service does once it has loaded the model (app/services.py, model.openmp).
    release_openmp_threads()
    if n == max(args.sizes):
        for name, batch in (("batching_on", args.batch_max), ("batching_off", 1)):
            searcher = Searcher(model, live, make_session_factory(make_engine(url)), batch_max_size=batch,
                                batch_max_wait_s=args.batch_wait_ms / 1000)  # fmt: skip
            result[f"in_process_qps_{name}"] = asyncio.run(
                throughput(searcher, texts, args.clients, args.requests)
            )
    live.close()
    if args.http:
        for name, batch in (("batching_on", args.batch_max), ("batching_off", 1)):
            if n != max(args.sizes) and name == "batching_off":
                continue
            proc, base = serve(root, url, args, batch, out / f"server-{n}-{name}.log")
            try:
                if name == "batching_on":
                    result["http_single"] = asyncio.run(http_run(base, texts, 1, args.queries))
                    result["http_single_broad"] = asyncio.run(
                        http_run(base, texts, 1, args.queries, rerank=False)
                    )
                if n == max(args.sizes):
                    result[f"http_{name}"] = asyncio.run(http_run(base, texts, args.clients, args.requests))
            finally:
                stop(proc)
    return result


def run_milvus(
    root: Path, url: str, model: Any, cls: np.ndarray, texts: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """The same library copied into a Milvus collection, then the same one-query runs on it."""
    kind, build, search = parse_index_spec(args.milvus_index)
    config = MilvusConfig(args.milvus_uri or str(root / "milvus.db"), index_type=kind, index_params=build,
                          search_params=search, prefix="bench", timeout_s=120.0)  # fmt: skip
    cfg = model.config
    with MilvusIndex(config, model.model_id, cfg.embed_dim, cfg.num_frames) as index:
        t = time.perf_counter()
        rebuild(index, DataDir(root), make_session_factory(make_engine(url)), model.model_id)
        fill_s = time.perf_counter() - t
        out = {
            "index": {
                "factory": index.factory,
                "size": index.size,
                "recall@10": recall_at_10(index, cls, args),
            }
        }
        out["fill_s"] = fill_s
        out["in_process"] = in_process(model, index, url, texts, args)
        index.drop()
    return out


def report(results: list[dict[str, Any]]) -> None:
    f = "{:.1f}/{:.1f}".format
    for r in results:
        ip = r["in_process"]
        print(f"\n== N = {r['n']:,} segments ({r['index']['factory']}, recall@10 vs exact "
              f"{r['index']['recall@10']:.3f}; library built in {r['build_s']:.0f} s) ==")  # fmt: skip
        print("in-process, one query, p50/p99 ms:")
        print(f"  text encoding alone          {f(*ip['encode_alone'])}")
        for mode in ("two_stage", "broad_only"):
            stages = "  ".join(
                f"{s} {f(*ip[f'{mode}.{s}'])}" for s in ("encode", "faiss", "catalog", "tokens", "rerank")
            )
            print(f"  {mode:<10} total {f(*ip[f'{mode}.wall']):>12}   {stages}")
        if "milvus" in r:
            m = r["milvus"]
            print(f"  Milvus ({m['index']['factory']}, recall@10 {m['index']['recall@10']:.3f}, filled in "
                  f"{m['fill_s']:.0f} s), the same runs (the faiss column is the Milvus search):")  # fmt: skip
            for mode in ("two_stage", "broad_only"):
                stages = "  ".join(
                    f"{s} {f(*m['in_process'][f'{mode}.{s}'])}"
                    for s in ("encode", "faiss", "catalog", "tokens", "rerank")
                )
                print(f"  {mode:<10} total {f(*m['in_process'][f'{mode}.wall']):>12}   {stages}")
        two, broad, enc = ip["two_stage.wall"][0], ip["broad_only.wall"][0], ip["encode_alone"][0]
        print(f"  ratios: two-stage / encode = {two / enc:.2f} (goal <= 1.5);"
              f" focused view adds {100 * (two - broad) / broad:+.1f}% to broad-only (goal <= 10%)")  # fmt: skip
        if "in_process_qps_batching_on" in r:
            on, off = r["in_process_qps_batching_on"], r["in_process_qps_batching_off"]
            print(
                f"  in-process throughput, 16 clients: batching on {on:.1f} q/s, off {off:.1f} q/s, x{on / off:.2f}"
            )
        if "http_single" in r:
            for key in ("http_single", "http_single_broad"):
                h = r[key]
                print(f"  HTTP one client {'two-stage' if key == 'http_single' else 'broad-only'}: client "
                      f"{f(*h['wall'])}  server total {f(*h['total'])}  queue {f(*h['queue'])}")  # fmt: skip
        if "http_batching_on" in r:
            on, off = r["http_batching_on"]["qps"], r["http_batching_off"]["qps"]
            print(f"  HTTP throughput, 16 clients: batching on {on:.1f} q/s (client p50/p99 "
                  f"{f(*r['http_batching_on']['wall'])}), off {off:.1f} q/s ({f(*r['http_batching_off']['wall'])}),"
                  f" x{on / off:.2f} (goal >= 3)")  # fmt: skip
            b = r["http_batching_on"]
            print(f"    batching on: batch size p50 {b['batch_size'][0]:.0f}, server total {f(*b['total'])},"
                  f" encode {f(*b['encode'])}, queue {f(*b['queue'])}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 100_000])
    p.add_argument("--model", default="ViT-B-32", help="preset (random weights are fine for timing)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--factory", default="HNSW32")
    p.add_argument("--ef-search", type=int, default=64)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--clusters", type=int, default=512)
    p.add_argument("--queries", type=int, default=100, help="timed single queries per variant")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=320, help="requests per throughput run")
    p.add_argument("--batch-max", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=3.0)
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads, here and in the server (TVS_TORCH_THREADS)"
    )
    p.add_argument("--no-http", dest="http", action="store_false")
    p.add_argument("--backend", choices=["faiss", "milvus"], default="faiss",
                   help="milvus: also measure each size on a Milvus collection, beside FAISS")  # fmt: skip
    p.add_argument("--milvus-uri", default=None, help="default: Milvus Lite, <out>/n<N>/milvus.db")
    p.add_argument("--milvus-index", default="FLAT", help="the CLS field's index (TVS_MILVUS_INDEX syntax)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="keep the libraries and JSON here (default: temp)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = prepare_for_inference(load_model(args.model), None, args.precision)
    texts = queries(args.warmup + args.queries + args.requests, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        print(
            f"model {model.model_id} ({model.dtype}, torch threads {torch.get_num_threads()}), factory {args.factory}"
        )
        results = [run_size(n, model, texts, args, out) for n in args.sizes]
        (out / "results.json").write_text(json.dumps(results, indent=2))
        report(results)


if __name__ == "__main__":
    main()
