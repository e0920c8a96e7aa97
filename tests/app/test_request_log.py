"""Logs of the API: JSON lines under uvicorn, the request id on each line of a request and in X-Request-ID,
one access line per request, one outcome line per ingest job."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.processes import start_api, stop, wait_ready


def _lines(log: Path) -> list[dict[str, Any]]:
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "the service logged nothing"
    try:
        return [json.loads(line) for line in lines]
    except json.JSONDecodeError as e:
        raise AssertionError(f"not one JSON object a line:\n{text[-3000:]}") from e


def test_uvicorn_logs_json_with_request_ids_access_lines_and_job_outcomes(
    tmp_path: Path, new_database, clips
) -> None:
    log = tmp_path / "api.log"
    proc, base = start_api(tmp_path / "data", new_database("sqlite"), log, TVS_LOG_FORMAT="json")
    try:
        wait_ready(proc, base, log, timeout_s=300)  # a loaded CI machine imports torch slowly
        with open(clips[0]["path"], "rb") as f:
            r = httpx.post(
                f"{base}/videos",
                files={"file": ("a.mp4", f, "video/mp4")},
                headers={"X-Request-ID": "upload-1"},
                timeout=30,
            )
        assert r.status_code == 202 and r.headers["x-request-id"] == "upload-1", r.text
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/jobs/{job_id}").json()["state"] not in ("ready", "failed"):
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.1)
        forged = httpx.get(f"{base}/videos/999", headers={"X-Request-ID": "a b"})  # not a sane id: replaced
        assert forged.status_code == 404 and re.fullmatch(r"[0-9a-f]{32}", forged.headers["x-request-id"])
    finally:
        stop(proc)
    lines = _lines(log)
    assert any(
        line["logger"] == "app.services" and line["message"].startswith("ready: model") for line in lines
    )
    assert any(line["logger"].startswith("uvicorn") for line in lines), (
        "uvicorn's own lines go through it too"
    )
    accepted = [line for line in lines if line["logger"] == "app.routes.videos"]
    assert [(a["request_id"], a["job_id"], a["source"]) for a in accepted] == [
        ("upload-1", job_id, "multipart")
    ]
    access = {(a["method"], a["path"], a["status"]): a for a in lines if a["logger"] == "app.access"}
    assert access["POST", "/videos", 202]["request_id"] == "upload-1"
    assert access["POST", "/videos", 202]["duration_ms"] > 0
    assert access["GET", "/videos/999", 404]["request_id"] == forged.headers["x-request-id"]
    outcome = [line for line in lines if line["logger"] == "indexer.worker" and line.get("job_id") == job_id]
    assert len(outcome) == 1 and outcome[0]["state"] == "ready" and outcome[0]["error"] is None, outcome
    assert outcome[0]["seconds"] > 0 and outcome[0]["video_id"] == r.json()["video_id"]


def test_text_lines_carry_the_request_id_and_a_failed_job_says_why(
    tmp_path: Path, launch, new_database, hostile, api, capsys: pytest.CaptureFixture[str]
) -> None:
    with launch(tmp_path / "data", new_database("sqlite"), log_format="text") as client:
        r = api.upload(client, hostile["truncated"], **{"X-Request-ID": "rid-text-1"})
        assert r.status_code == 202, r.text
        job = api.wait_job(client, r.json()["job_id"])
    err = capsys.readouterr().err
    assert re.search(r" INFO app\.access \[rid-text-1\] POST /videos 202 [0-9.]+ ms$", err, re.M), err
    assert re.search(rf"WARNING indexer\.worker \[-\] job {job['id']} video .*: {job['state']}", err), err
    assert job["error"] and job["error"] in err
