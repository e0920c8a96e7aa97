"""Load test: N concurrent search clients for T seconds while uploads are ingested; latency, errors and API RSS.

Starts the service itself (uvicorn subprocess on loopback, `tiny` model by default, a fresh data directory with
a library of generated clips), then runs an asyncio httpx client. Bounded in time and in clients; nothing
leaves 127.0.0.1.

    python bench/load.py --clients 50 --seconds 60 --json bench/load.json

Exits 1 when a request failed or the API process's RSS grew by 10% or more from the first to the last
quarter of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving import start_uvicorn  # noqa: E402

from synth.media import write_pattern_video  # noqa: E402

WORDS = "red blue green square circle moving left right fast slow bright dark stripes a the over".split()


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _clips(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_pattern_video(
            folder / f"clip{i:03d}.mp4", 1.0 + 0.25 * (i % 8), 64 + 16 * (i // 8), 48, 8, gop=8
        )
        for i in range(count)
    ]


def _start_service(data: Path, model: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "TVS_DATA_DIR": str(data), "TVS_MODEL": model, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "indexer", "migrate", "--data-dir", str(data)], env=env, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return start_uvicorn(env, log, timeout_s=180)


async def _upload(client: httpx.AsyncClient, path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        r = await client.post("/videos", files={"file": (path.name, f.read(), "video/mp4")})
    r.raise_for_status()
    return dict(r.json())


async def _wait_jobs(client: httpx.AsyncClient, job_ids: list[int], timeout_s: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    states: dict[int, str] = {}
    while time.monotonic() < deadline:
        for job_id in job_ids:
            if states.get(job_id) not in ("ready", "failed"):
                states[job_id] = (await client.get(f"/jobs/{job_id}")).json()["state"]
        if all(s in ("ready", "failed") for s in states.values()):
            break
        await asyncio.sleep(0.2)
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    return counts


async def _run(args: argparse.Namespace, base: str, pid: int, uploads: list[Path]) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        latencies: list[float] = []
        errors: list[str] = []
        rss: list[tuple[float, int]] = []
        upload_jobs: list[int] = []
        start = time.monotonic()
        end = start + args.seconds

        async def searcher(n: int) -> None:
            rng = random.Random(args.seed + n)
            while time.monotonic() < end:
                body = {"query": " ".join(rng.sample(WORDS, 4)), "limit": 10, "rerank": rng.random() < 0.8}
                t = time.perf_counter()
                try:
                    r = await client.post("/search", json=body)
                    ok = r.status_code == 200
                    if not ok:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t)

        async def uploader() -> None:
            for path in uploads:
                if time.monotonic() >= end:
                    return
                try:
                    upload_jobs.append((await _upload(client, path))["job_id"])
                except httpx.HTTPError as e:
                    errors.append(f"upload {path.name}: {e}")
                await asyncio.sleep(args.seconds / max(1, len(uploads)))

        async def sampler() -> None:
            while time.monotonic() < end:
                rss.append((time.monotonic() - start, _rss_bytes(pid)))
                await asyncio.sleep(0.5)

        await asyncio.gather(*(searcher(n) for n in range(args.clients)), uploader(), sampler())
        elapsed = time.monotonic() - start
        jobs = await _wait_jobs(client, upload_jobs, timeout_s=120)

    quarter = max(1, len(rss) // 4)
    first = statistics.fmean(v for _, v in rss[:quarter])
    last = statistics.fmean(v for _, v in rss[-quarter:])
    lat_ms = sorted(x * 1000 for x in latencies)
    q = statistics.quantiles(lat_ms, n=100) if len(lat_ms) > 1 else [float("nan")] * 99
    return {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests": len(latencies) + len(errors),
        "errors": len(errors),
        "error_samples": errors[:5],
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(q[49], 1),
        "p99_ms": round(q[98], 1),
        "max_ms": round(lat_ms[-1], 1) if lat_ms else None,
        "uploads_during_run": len(upload_jobs),
        "upload_jobs": jobs,
        "rss_mb_first_quarter": round(first / 2**20, 1),
        "rss_mb_last_quarter": round(last / 2**20, 1),
        "rss_growth_pct": round(100 * (last - first) / first, 2),
        "rss_samples": len(rss),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--library", type=int, default=24, help="clips indexed before the run")
    p.add_argument("--uploads", type=int, default=12, help="clips uploaded (and indexed) during the run")
    p.add_argument("--model", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args()
    if not 1 <= args.clients <= 500 or not 1 <= args.seconds <= 3600:
        raise SystemExit("--clients must be 1..500 and --seconds 1..3600 (a bounded, loopback-only test)")
    with tempfile.TemporaryDirectory(prefix="tvs-load-") as tmp:
        folder = Path(tmp)
        clips = _clips(folder / "clips", args.library + args.uploads)
        proc, base = _start_service(folder / "data", args.model, folder / "api.log")
        try:

            async def preload() -> dict[str, int]:
                async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                    ids = [(await _upload(client, c))["job_id"] for c in clips[: args.library]]
                    return await _wait_jobs(client, ids, timeout_s=300)

            library = asyncio.run(preload())
            report = asyncio.run(_run(args, base, proc.pid, clips[args.library :]))
            report["library_jobs"] = library
        finally:
            proc.terminate()
            proc.wait(60)
    report["ok"] = report["errors"] == 0 and report["rss_growth_pct"] < 10.0
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
