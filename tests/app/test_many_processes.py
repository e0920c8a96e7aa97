"""Two API processes and two `indexer worker` processes on one data directory and one PostgreSQL catalog.

Uploads go to one API, searches to the other. No job runs twice; a worker SIGKILLed while it holds
jobs leaves them to the other worker once their leases expire; every upload becomes searchable in both.
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from helpers.processes import start_api, start_worker, stop, wait_ready
from sqlalchemy import func, select

from indexer import jobs
from indexer.catalog import Job, Segment, Video
from indexer.cli import main
from indexer.db import make_engine, make_session_factory, session_scope
from model.video import segment_windows
from synth.generator import write_pattern_video

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

LEASE_S = 4.0  # short for the test; heartbeats every third of it
POLL_S = 0.05
# Many small windows per clip: each job decodes and encodes long enough to be caught holding it.
WORKER_ARGS = ["--lease-s", str(LEASE_S), "--poll-s", "0.1", "--max-segment-s", "0.5", "--window-s", "0.1"]
CLAIM = re.compile(r"worker (\S+) claimed job (\d+) \(attempt (\d+)\)")


def _upload(base: str, path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        r = httpx.post(f"{base}/videos", files={"file": (path.name, f, "video/mp4")}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["video_id"], r.json()["job_id"]


def _found(base: str, video_ids: list[int]) -> set[int]:
    body = {"query": "a shape moves", "limit": 100, "rerank": False, "group_by": "video"}
    r = httpx.post(f"{base}/search", json={**body, "filter": {"video_ids": video_ids}}, timeout=30)
    assert r.status_code == 200, r.text
    return {hit["video_id"] for hit in r.json()["results"]}


def _until(predicate, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_two_apis_two_workers_one_library(new_database, clips, tmp_path: Path) -> None:
    db_url = new_database("postgres")
    data = tmp_path / "data"
    logs = {name: tmp_path / f"{name}.log" for name in ("api1", "api2", "worker1", "worker2")}
    procs = {}
    api_env = {"TVS_WORKER": "false", "TVS_TORCH_THREADS": "1"}
    procs["api1"], api1 = start_api(data, db_url, logs["api1"], **api_env)
    procs["api2"], api2 = start_api(data, db_url, logs["api2"], **api_env)
    for name in ("worker1", "worker2"):
        procs[name] = start_worker(data, db_url, logs[name], *WORKER_ARGS, OMP_NUM_THREADS="1")
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    try:
        wait_ready(procs["api1"], api1, logs["api1"])
        wait_ready(procs["api2"], api2, logs["api2"])
        long_clip = write_pattern_video(tmp_path / "long.mp4", 30.0, 160, 120, 12, gop=12)
        long_video, long_job = _upload(api1, long_clip)

        # SIGKILL the worker that takes the long video, while it works on it.
        def holder() -> str | None:
            with session_scope(factory) as session:
                job = jobs.get_job(session, long_job)
                return job.lease_owner if job is not None and job.state in jobs.ACTIVE_STATES else None

        owner = _until(holder, 60, "a worker to claim the long video's job")
        victim = next(n for n in ("worker1", "worker2") if f":{procs[n].pid}:" in f"{owner}:")
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait(10)
        killed_at = datetime.now(timezone.utc)
        survivor = "worker2" if victim == "worker1" else "worker1"
        with session_scope(factory) as session:
            held = {
                j.id: j.lease_expires_at
                for j in session.scalars(
                    select(Job).where(Job.lease_owner == owner, Job.state.in_(jobs.ACTIVE_STATES))
                )
            }
        assert long_job in held, "the killed worker finished the job between the check and the kill"
        assert all(expires > killed_at for expires in held.values()), "its leases were still running"

        # More uploads meanwhile: the survivor runs them while the killed worker's leases run out.
        uploads = [(long_video, long_job)] + [_upload(api1, c["path"]) for c in clips[:7]]
        video_ids = [v for v, _ in uploads]

        # Its jobs stay with it until their leases expire; then the survivor takes them over.
        taken_at: dict[int, datetime] = {}

        def taken_over() -> bool:
            with session_scope(factory) as session:
                for job in session.scalars(select(Job).where(Job.id.in_(held))):
                    if job.id not in taken_at and (job.lease_owner != owner or job.state == "ready"):
                        taken_at[job.id] = datetime.now(timezone.utc)
            return len(taken_at) == len(held)

        _until(taken_over, LEASE_S + 30, "the survivor to take the killed worker's jobs over")
        for job_id, expires in held.items():
            early = (expires - taken_at[job_id]).total_seconds()
            assert early <= POLL_S + 0.05, f"job {job_id} was taken {early:.2f} s before its lease expired"

        def all_settled() -> bool:
            with session_scope(factory) as session:
                states = session.scalars(select(Job.state)).all()
            return len(states) == len(uploads) and set(states) == {"ready"}

        _until(all_settled, 90, "every job to be ready")

        # No job ran twice: one claim each, two for those the killed worker held (its own, the takeover).
        claims: dict[int, list[tuple[str, int]]] = {}
        for name in ("worker1", "worker2"):
            for _, job_id, attempt in CLAIM.findall(logs[name].read_text()):
                claims.setdefault(int(job_id), []).append((name, int(attempt)))
        with session_scope(factory) as session:
            attempts = dict(session.execute(select(Job.id, Job.attempts)).tuples().all())
            per_video = session.execute(
                select(Segment.video_id, func.count(), func.count(func.distinct(Segment.ordinal)), Video.duration_s)
                .join(Video, Video.id == Segment.video_id)
                .group_by(Segment.video_id, Video.duration_s)
            ).tuples().all()  # fmt: skip
        for _, job_id in uploads:
            want = [(victim, 1), (survivor, 2)] if job_id in held else None
            got = sorted(claims.get(job_id, []), key=lambda c: c[1])
            assert got == want if want else len(got) == 1, f"job {job_id} claims: {got}"
            assert attempts[job_id] == (2 if job_id in held else 1), f"job {job_id}: {attempts[job_id]}"
        assert Counter(n for c in claims.values() for n, _ in c)[survivor] >= len(held)
        assert sorted(v for v, *_ in per_video) == sorted(video_ids)
        for video_id, count, ordinals, duration in per_video:  # every window once: none doubled, none lost
            assert count == ordinals == len(segment_windows(duration, 0.5, 0.1)) > 1, (
                video_id,
                count,
                ordinals,
            )

        # Every upload is searchable on both APIs (the change feed), and ready through the other one.
        for base in (api2, api1):
            _until(
                lambda base=base: _found(base, video_ids) == set(video_ids), 10, f"{base} to find every video"
            )
        for video_id in video_ids:
            assert httpx.get(f"{api2}/videos/{video_id}").json()["status"] == "ready"
        stop(procs[survivor])
        assert procs[survivor].returncode == 0, logs[survivor].read_text()[-3000:]

        # What the killed worker had written for its jobs was freed on takeover: the library agrees.
        db = ["--data-dir", str(data), "--database-url", db_url]
        assert main(["rebuild-index", *db]) == 0
        assert main(["verify", *db]) == 0
    finally:
        for proc in procs.values():
            stop(proc)
        engine.dispose()
