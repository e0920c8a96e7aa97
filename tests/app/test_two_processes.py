"""Two API processes sharing one data directory and one PostgreSQL see each other's uploads and deletes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers.processes import start_api, stop, wait_ready

pytestmark = pytest.mark.postgres
VISIBLE_WITHIN_S = 2.0


@pytest.fixture
def two_servers(new_database, serve, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A uvicorn subprocess, and this test process serving the same app (one import of torch, not two)."""
    db_url = new_database("postgres")
    data = tmp_path / "data"
    log = tmp_path / "b.log"
    proc, other = start_api(data, db_url, log)
    try:
        with serve(data, db_url, follow_interval_s=0.25) as here:
            wait_ready(proc, other, log)
            yield here, other
    finally:
        stop(proc)


def _ids(base: str) -> set[int]:
    body = httpx.post(f"{base}/search", json={"query": "a shape moves", "limit": 100, "rerank": False}).json()
    return {hit["video_id"] for hit in body["results"]}


def _upload_and_wait(base: str, path: Path) -> tuple[int, float]:
    with open(path, "rb") as f:
        r = httpx.post(f"{base}/videos", files={"file": (path.name, f)}, timeout=30)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/jobs/{r.json()['job_id']}").json()
        if job["state"] == "ready":
            return r.json()["video_id"], time.monotonic()
        assert job["state"] != "failed", job
        time.sleep(0.05)
    raise AssertionError("the job did not finish")


def _seconds_until(base: str, predicate) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while time.monotonic() - start < 10:
        if predicate(_ids(base)):
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{base} never saw the change")


def test_uploads_and_deletes_propagate_between_processes(two_servers, clips):
    a, b = two_servers
    video_a, _ = _upload_and_wait(a, clips[0]["path"])
    lag_b = _seconds_until(b, lambda ids: video_a in ids)
    video_b, _ = _upload_and_wait(b, clips[1]["path"])
    lag_a = _seconds_until(a, lambda ids: video_b in ids)
    assert lag_b <= VISIBLE_WITHIN_S and lag_a <= VISIBLE_WITHIN_S, (lag_a, lag_b)
    # The job may have run in either process's worker: b's index follows the change feed, like a's.
    deadline = time.monotonic() + VISIBLE_WITHIN_S
    while httpx.get(f"{b}/health").json()["index"]["size"] != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{b}/health").json()["index"]["size"] == 2
    assert httpx.delete(f"{a}/videos/{video_b}").status_code == 200
    assert video_b not in _ids(b)  # at once: results are checked against the catalog
    assert httpx.get(f"{b}/videos/{video_b}").status_code == 404
