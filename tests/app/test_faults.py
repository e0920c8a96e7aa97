"""Faults while serving: kill -9 mid-ingest, a full data directory, an unreachable database, damaged files."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.ports import free_port
from sqlalchemy import func, select

from indexer.catalog import Job
from indexer.cli import main as indexer_main
from indexer.db import make_engine
from indexer.jobs import ACTIVE_STATES
from synth.media import write_pattern_video

FORK_SERVER = Path(__file__).with_name("fork_server.py")
TRIALS = 20
SEED = 20251127
READY_TIMEOUT_S = 60.0


class Procs:
    """A fork server (tests/app/fork_server.py) and the API servers and workers it forked for one test."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.server = subprocess.Popen(
            [sys.executable, str(FORK_SERVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("TVS_")},
        )
        assert self.server.stdout is not None
        line = self.server.stdout.readline()
        assert json.loads(line or "{}").get("ready"), "the fork server did not start"
        self.children: list[int] = []
        self.count = 0

    def fork(self, request: dict[str, Any]) -> int:
        assert self.server.stdin is not None and self.server.stdout is not None
        self.count += 1
        request = {"log": str(self.folder / f"child{self.count:03d}.log"), **request}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        pid = int(json.loads(self.server.stdout.readline())["pid"])
        self.children.append(pid)
        return pid

    def api(self, env: dict[str, str]) -> tuple[int, str]:
        port = free_port()
        pid = self.fork({"kind": "api", "port": port, "env": env})
        return pid, f"http://127.0.0.1:{port}"

    def indexer(self, args: list[str], env: dict[str, str], fsize: int | None = None) -> int:
        return self.fork({"kind": "indexer", "args": args, "env": env, "fsize": fsize})

    def log(self, pid: int) -> str:
        n = self.children.index(pid) + 1
        path = self.folder / f"child{n:03d}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def close(self) -> None:
        for pid in self.children:
            kill(pid)
        if self.server.stdin is not None:
            self.server.stdin.close()
        self.server.wait(30)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill(pid: int, sig: int = signal.SIGKILL, wait_s: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + wait_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(pid), f"process {pid} did not stop after signal {sig}"


def wait_ready(procs: Procs, pid: int, base: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert alive(pid), f"the API process exited:\n{procs.log(pid)}"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"the API did not become ready:\n{procs.log(pid)}")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


def service_env(data: Path, db_url: str, **extra: str) -> dict[str, str]:
    return {
        "TVS_DATA_DIR": str(data),
        "TVS_DATABASE_URL": db_url,
        "TVS_MODEL": "tiny",
        "TVS_FOLLOW_INTERVAL_S": "0.1",
        "TVS_BATCH_MAX_WAIT_MS": "2",
        **extra,
    }


def worker_args(data: Path, db_url: str) -> list[str]:
    return ["worker", "--data-dir", str(data), "--database-url", db_url, "--model", "tiny", "--poll-s", "0.2"]


def upload(base: str, path: Path, timeout: float = 20.0) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(f"{base}/videos", files={"file": (path.name, f, "video/mp4")}, timeout=timeout)


def wait_settled(base: str, timeout_s: float) -> dict[int, dict[str, Any]]:
    """Every video of the catalog once none is pending or indexing; fails if some stay unfinished."""
    deadline = time.monotonic() + timeout_s
    videos: dict[int, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        videos, offset = {}, 0
        while True:
            page = httpx.get(f"{base}/videos", params={"offset": offset, "limit": 100}, timeout=10).json()
            videos.update((v["id"], v) for v in page["data"])
            offset += 100
            if offset >= page["count"]:
                break
        if all(v["status"] in ("ready", "failed") for v in videos.values()):
            return videos
        time.sleep(0.2)
    stuck = {i: v["status"] for i, v in videos.items() if v["status"] not in ("ready", "failed")}
    raise AssertionError(f"videos still unfinished after {timeout_s} s: {stuck}")


def wait_for_running_job(db_url: str, timeout_s: float) -> bool:
    """True once some job is decoding or encoding (read from the catalog), False after timeout_s."""
    engine = make_engine(db_url)
    deadline = time.monotonic() + timeout_s
    try:
        with engine.connect() as conn:
            while time.monotonic() < deadline:
                if conn.execute(select(func.count()).where(Job.state.in_(ACTIVE_STATES))).scalar():
                    return True
                conn.rollback()  # end the read transaction so the next poll sees new commits
                time.sleep(0.005)
    finally:
        engine.dispose()
    return False


def media_bytes(base: str, video_id: int) -> bytes:
    """The stored bytes of a video, through the media endpoint."""
    r = httpx.get(f"{base}/videos/{video_id}/media", timeout=10)
    assert r.status_code == 200, r.text
    return r.content


# --- kill -9 during ingestion ---------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_api_and_worker_mid_ingest_loses_and_doubles_nothing(procs, new_database, tmp_path) -> None:
    rng = random.Random(SEED)
    lib = tmp_path / "lib"
    lib.mkdir()
    clips = [
        write_pattern_video(lib / f"clip{i:02d}.mp4", 1.0 + 0.125 * (i % 8), 64 + 16 * (i // 8), 48, 8, gop=8)
        for i in range(3 * TRIALS)
    ]
    digests = {hashlib.sha256(c.read_bytes()).hexdigest(): c for c in clips}
    assert len(digests) == len(clips), "every clip is different bytes"
    data, db_url = tmp_path / "data", new_database("sqlite")
    unsent = list(clips)
    accepted: dict[int, Path] = {}  # video id -> clip, for every upload answered 202
    outcomes = {"accepted": 0, "cut_off": 0, "trials_with_worker_process": 0, "aimed_kills_mid_job": 0}

    def send(path: Path, base: str) -> None:
        try:
            r = upload(base, path)
        except httpx.TransportError:
            outcomes["cut_off"] += 1  # killed before the answer: may or may not be kept, never half
            return
        assert r.status_code == 202, r.text
        accepted[r.json()["video_id"]] = path
        outcomes["accepted"] += 1

    for trial in range(TRIALS):
        separate = trial % 2 == 1  # odd trials: API without a worker thread + an `indexer worker` process
        api_pid, base = procs.api(service_env(data, db_url, TVS_WORKER=str(not separate).lower()))
        worker_pid = procs.indexer(worker_args(data, db_url), {}) if separate else None
        wait_ready(procs, api_pid, base)
        batch = [unsent.pop() for _ in range(rng.randint(1, 3))]
        senders = [threading.Thread(target=send, args=(p, base)) for p in batch]
        for t in senders:
            t.start()
        # A random moment: during an upload, between the 202 and the job, while decoding, encoding or
        # committing (a 1 s clip takes a few hundred ms to index here).
        delay = rng.uniform(0.05, 1.0)
        victims = [(delay, api_pid)]
        if worker_pid is not None:
            victims.append((rng.uniform(0.05, 1.0), worker_pid))
            outcomes["trials_with_worker_process"] += 1
        if trial % 4 >= 2:
            # Aimed: kill whichever process runs the worker while a job is decoding or encoding. Random
            # moments alone land mostly before or after jobs on a fast machine (a job lasts ~0.2 s).
            owner = worker_pid if worker_pid is not None else api_pid
            if wait_for_running_job(db_url, timeout_s=20):
                time.sleep(rng.uniform(0.0, 0.05))
                outcomes["aimed_kills_mid_job"] += 1
            kill(owner)
            victims = [(at, pid) for at, pid in victims if pid != owner]
        started = time.monotonic()
        for at, pid in sorted(victims):
            time.sleep(max(0.0, started + at - time.monotonic()))
            kill(pid)
        for t in senders:
            t.join(30)

    api_pid, base = procs.api(service_env(data, db_url))
    wait_ready(procs, api_pid, base)
    videos = wait_settled(base, timeout_s=90)
    print(f"kill -9 trials: {TRIALS}, uploads {outcomes}, videos in the catalog {len(videos)}")
    assert outcomes["accepted"] >= TRIALS // 2, f"too few uploads got through to test anything: {outcomes}"
    failed = {i: v for i, v in videos.items() if v["status"] != "ready"}
    assert not failed, f"videos that did not end ready: {failed}"
    for video_id, clip in accepted.items():
        assert video_id in videos, f"video {video_id} was answered 202 and is gone"
        media = httpx.get(f"{base}/videos/{video_id}/media", timeout=10)
        assert media.status_code == 200 and media.content == clip.read_bytes(), "the stored bytes are whole"
    names = [v["title"] for v in videos.values()]
    assert len(names) == len(set(names)), "no clip was stored twice"
    segments, resumed = 0, 0
    for video_id in videos:
        detail = httpx.get(f"{base}/videos/{video_id}", timeout=10).json()
        assert len(detail["segments"]) == 1, f"video {video_id} has {len(detail['segments'])} segments"
        assert detail["latest_job"]["state"] == "ready"
        segments += 1
        resumed += detail["latest_job"]["attempts"] > 1
    print(f"jobs resumed after a kill: {resumed}")
    assert resumed >= 3, "the kills should land while jobs run, not only between them"
    health = httpx.get(f"{base}/health", timeout=10).json()
    assert health["index"]["size"] == segments, "the index holds each segment once"
    # A kill between storing the file and committing its row leaves the file without a video: a leftover
    # of an upload that was never answered, whole (named by its sha256), never a second copy of a video.
    kept = {hashlib.sha256(media_bytes(base, v)).hexdigest() for v in videos}
    stored = {p.stem: p for p in (data / "videos").rglob("*") if p.is_file()}
    assert kept <= set(stored), "every video's file is stored"
    for sha in set(stored) - kept:
        assert hashlib.sha256(stored[sha].read_bytes()).hexdigest() == sha, "a leftover is a whole file"
        assert digests[sha] not in accepted.values(), "a leftover never belongs to an accepted upload"
    print(f"stored files without a video (uploads cut off after storing): {len(set(stored) - kept)}")
    kill(api_pid, signal.SIGTERM)  # a clean stop saves the index snapshot that verify checks
    assert indexer_main(["verify", "--data-dir", str(data), "--database-url", db_url]) == 0


# --- the database goes away -----------------------------------------------------------------------------
class TcpProxy:
    """Forwards a loopback port to the database; close() cuts every connection and refuses new ones."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tcp-proxy", daemon=True)
        self.thread.start()
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.StreamWriter] = set()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def open(self) -> None:
        self._call(self._open())

    def close(self) -> None:
        self._call(self._close())

    def stop(self) -> None:
        self.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _open(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.pipes):
            writer.transport.abort()  # a reset, as when the server or the network goes away
        self.pipes.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.pipes |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while chunk := await src.read(65536):
                    dst.write(chunk)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.pipes -= {writer, up_writer}


@pytest.fixture
def proxied_postgres(new_database) -> Iterator[tuple[str, TcpProxy]]:
    from sqlalchemy.engine import make_url

    url = make_url(new_database("postgres"))
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.open()
    try:
        yield url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False), proxy
    finally:
        proxy.stop()


def _until(condition: Any, timeout_s: float, what: str) -> Any:
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            last = condition()
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout_s} s (last: {last})")


@pytest.mark.postgres
def test_database_outage_answers_503_and_the_service_recovers_by_itself(
    proxied_postgres, serve, clips, tmp_path
) -> None:
    db_url, proxy = proxied_postgres
    with serve(tmp_path / "data", db_url) as base:
        first = upload(base, clips[0]["path"])
        assert first.status_code == 202, first.text
        _until(
            lambda: httpx.get(f"{base}/jobs/{first.json()['job_id']}").json()["state"] == "ready", 60, "ready"
        )
        # Searchable first: a search that finds nothing never reads the catalog (and rightly answers 200).
        _until(
            lambda: httpx.post(f"{base}/search", json={"query": "red"}).json()["results"], 30, "searchable"
        )

        proxy.close()
        started = time.monotonic()
        checks = {
            "list": lambda: httpx.get(f"{base}/videos"),
            "detail": lambda: httpx.get(f"{base}/videos/{first.json()['video_id']}"),
            "job": lambda: httpx.get(f"{base}/jobs/{first.json()['job_id']}"),
            "search": lambda: httpx.post(f"{base}/search", json={"query": "red"}),
            "upload": lambda: upload(base, clips[1]["path"]),
        }
        for name, call in checks.items():
            r = call()
            assert r.status_code == 503, (name, r.status_code, r.text)
            assert r.headers["retry-after"] == "5", name
            assert "database is unreachable" in r.json()["detail"], name
        health = httpx.get(f"{base}/health")
        assert health.status_code == 503
        assert health.json()["ready"] is False and health.json()["status"] == "database unreachable"
        metrics = httpx.get(f"{base}/metrics")
        assert metrics.status_code == 200 and "tvs_index_size 1.0" in metrics.text, "metrics still scrape"
        assert not list((tmp_path / "data" / "incoming").glob("upload-*")), "a refused upload leaves nothing"
        time.sleep(max(0.0, 3.0 - (time.monotonic() - started)))  # a few seconds down

        proxy.open()
        _until(lambda: httpx.get(f"{base}/health").status_code == 200, 30, "health back to 200")
        assert httpx.get(f"{base}/videos").json()["count"] == 1
        second = upload(base, clips[1]["path"])
        assert second.status_code == 202, second.text
        # The worker thread and the change follower outlived the outage: the new video is indexed and found.
        job = _until(
            lambda: (
                (j := httpx.get(f"{base}/jobs/{second.json()['job_id']}").json())["state"]
                in ("ready", "failed")
                and j
            ),
            60,
            "the job after the outage",
        )
        assert job["state"] == "ready", job
        _until(
            lambda: (
                second.json()["video_id"]
                in {
                    h["video_id"]
                    for h in httpx.post(f"{base}/search", json={"query": "x", "limit": 10}).json()["results"]
                }
            ),
            30,
            "the new video searchable",
        )


# --- the data directory fills up ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.postgres
def test_a_full_data_directory_fails_the_job_clearly_and_search_keeps_serving(
    procs, new_database, clips, tmp_path
) -> None:
    # PostgreSQL, so that the catalog lives outside the size-limited process (a SQLite file would be
    # limited too). RLIMIT_FSIZE works for root, where chmod-based read-only folders do not.
    data, db_url = tmp_path / "data", new_database("postgres")
    api_pid, base = procs.api(service_env(data, db_url, TVS_WORKER="false"))
    worker = procs.indexer(worker_args(data, db_url), {})
    wait_ready(procs, api_pid, base)
    first = upload(base, clips[0]["path"]).json()
    _until(lambda: httpx.get(f"{base}/jobs/{first['job_id']}").json()["state"] == "ready", 60, "first ready")
    kill(worker, signal.SIGTERM)

    # Token records start at 4 KiB into a shard: every write of the new video's tokens passes the limit.
    limited = procs.fork(
        {"kind": "indexer", "args": worker_args(data, db_url), "env": {}, "fsize": 4096, "log": os.devnull}
    )
    second = upload(base, clips[1]["path"]).json()
    job: dict[str, Any] = {}
    deadline = time.monotonic() + 90
    searches = 0
    while time.monotonic() < deadline:
        hits = httpx.post(f"{base}/search", json={"query": "red", "limit": 5}, timeout=10)
        assert hits.status_code == 200, hits.text
        assert {h["video_id"] for h in hits.json()["results"]} == {first["video_id"]}
        searches += 1
        job = httpx.get(f"{base}/jobs/{second['job_id']}").json()
        if job["state"] in ("ready", "failed"):
            break
        time.sleep(0.2)
    assert job["state"] == "failed", f"the job did not fail within 90 s: {job}"
    assert alive(limited), "the worker survives a full disk"
    assert "data directory hit a file-size limit" in job["error"] and "File too large" in job["error"], job
    assert job["attempts"] == job["max_attempts"], "a full disk may clear up: retried with back-off first"
    video = httpx.get(f"{base}/videos/{second['video_id']}").json()
    assert video["status"] == "failed" and video["error"] == job["error"] and video["segments"] == []
    print(f"disk full: job failed after {job['attempts']} attempts; {searches} searches served meanwhile")
    kill(limited, signal.SIGTERM)
    kill(api_pid, signal.SIGTERM)
    assert indexer_main(["verify", "--data-dir", str(data), "--database-url", db_url]) == 0


# --- damaged files at start-up ---------------------------------------------------------------------------
def _snapshot(data: Path) -> Path:
    (path,) = (data / "index").glob("*.faiss")
    return path


def _broad_ids(client: Any, api: Any) -> set[int]:
    hits = api.search(client, limit=100, rerank=False)
    assert hits.status_code == 200, hits.text
    return {h["video_id"] for h in hits.json()["results"]}


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_damaged_index_snapshot_is_rebuilt_not_served(
    damage, service, clips, api, tmp_path, db_url, caplog
) -> None:
    with service() as client:
        ids = set(api.ingest(client, [c["path"] for c in clips[:3]]))
    snapshot = _snapshot(tmp_path / "data")
    raw = bytearray(snapshot.read_bytes())
    if damage == "truncated":
        del raw[len(raw) // 2 :]
    else:
        raw[len(raw) // 2] ^= 0x01
    snapshot.write_bytes(bytes(raw))
    caplog.set_level("WARNING", logger="indexer.live_index")
    with service() as client:
        assert "index snapshot unusable" in caplog.text and "rebuilding" in caplog.text
        assert client.get("/health").json()["index"]["size"] == 3
        assert _broad_ids(client, api) == ids
        assert api.search(client).status_code == 200
    # The service replaced the damaged snapshot on the way out.
    args = ["verify", "--data-dir", str(tmp_path / "data"), "--database-url", db_url]
    assert indexer_main(args) == 0


def test_a_truncated_token_shard_is_detected_rebuilt_around_and_repaired(
    service, clips, api, tmp_path, db_url, caplog
) -> None:
    data = tmp_path / "data"
    with service() as client:
        ids = api.ingest(client, [c["path"] for c in clips[:3]])
        seg_of = {v: client.get(f"/videos/{v}").json()["segments"][0]["id"] for v in ids}
    (shard,) = data.glob("tokens/*/shard-*.tok")
    records_per_shard = 4096
    record = (shard.stat().st_size - 4096) // records_per_shard
    os.truncate(shard, 4096 + (min(seg_of.values()) + 1) * record)  # cut after the first record
    caplog.set_level("WARNING")
    with service() as client:
        assert "token store damaged" in caplog.text and "is truncated" in caplog.text
        # A reader cannot map a short shard: none of its segments is served until it is repaired.
        assert client.get("/health").json()["index"]["size"] == 0
        assert _broad_ids(client, api) == set()
        assert api.search(client).status_code == 200
    args = ["verify", "--data-dir", str(data), "--database-url", db_url]
    assert indexer_main(args) == 1, "verify reports the lost records"
    assert indexer_main([*args, "--repair", "--model", "tiny"]) == 0, "repair re-encodes their videos"
    with service() as client:
        assert client.get("/health").json()["index"]["size"] == 3
        assert _broad_ids(client, api) == set(ids)


def test_a_corrupt_token_record_is_caught_by_its_checksum_and_repaired(
    service, clips, api, tmp_path, db_url
) -> None:
    data = tmp_path / "data"
    with service() as client:
        ids = api.ingest(client, [c["path"] for c in clips[:2]])
        segs = [client.get(f"/videos/{v}").json()["segments"][0]["id"] for v in ids]
    (shard,) = data.glob("tokens/*/shard-*.tok")
    record = (shard.stat().st_size - 4096) // 4096
    with open(shard, "r+b") as f:  # one bit inside the second segment's frame tokens
        f.seek(4096 + segs[1] * record + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    with service() as client:
        r = api.search(client, limit=10)
        assert r.status_code == 200
        hits = {h["segment_id"]: h for h in r.json()["results"]}
        # Its CLS in the (valid) snapshot still finds it; its damaged tokens are never used to rerank it.
        assert hits[segs[1]]["delta"] == 0.0 and hits[segs[1]]["evidence_time"] is None
        assert hits[segs[0]]["evidence_time"] is not None
    args = ["verify", "--data-dir", str(data), "--database-url", db_url]
    assert indexer_main(args) == 1
    assert indexer_main([*args, "--repair", "--model", "tiny"]) == 0
    with service() as client:
        r = api.search(client, limit=10)
        assert {h["video_id"] for h in r.json()["results"]} == set(ids)
