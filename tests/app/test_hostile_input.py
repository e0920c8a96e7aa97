"""Hostile files and requests through the API: each is a failed job with a reason or a 4xx; never a 500 or a hang."""

from __future__ import annotations

import hashlib
import itertools
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from synth.media import write_hostile_files, write_pattern_video

FAIL_WITHIN_S = 60.0
BOUNDARY = "hostile-boundary"
HOUR_BOUND_S = 120.0


def _patch(data: bytes, box: bytes, offset: int, value: bytes) -> bytes:
    """Overwrite `value` at `offset` bytes after the type field of the first `box` (e.g. b"tkhd")."""
    at = data.index(box)
    out = bytearray(data)
    out[at + offset : at + offset + len(value)] = value
    return bytes(out)


def absurd_dimensions(src: Path, dest: Path) -> Path:
    data = src.read_bytes()
    huge = struct.pack(">I", 0xFFFF << 16)  # 65535.0 in 16.16 fixed point
    # tkhd (version 0): flags 4, times 8, track id 4, reserved 4, duration 4, reserved 8, layer/group/
    # volume/reserved 8, matrix 36 -> width at +80, height at +84 from the type field.
    data = _patch(data, b"tkhd", 80, huge)
    data = _patch(data, b"tkhd", 84, huge)
    # avc1 sample entry: reserved 6, data ref 2, pre-defined/reserved 16 -> width at +28, height at +30.
    data = _patch(data, b"avc1", 28, struct.pack(">HH", 0xFFFF, 0xFFFF))
    dest.write_bytes(data)
    return dest


def zero_fps(src: Path, dest: Path) -> Path:
    # mdhd (version 0): flags 4, creation 4, modification 4 -> timescale at +16; and the stts sample delta.
    data = _patch(src.read_bytes(), b"mdhd", 16, struct.pack(">I", 0))
    dest.write_bytes(_patch(data, b"stts", 16, struct.pack(">I", 0)))
    return dest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("corpus")
    files = write_hostile_files(folder)
    base = write_pattern_video(folder / "base.mp4", 2.0, 64, 48, 8, gop=8, faststart=True)
    files["absurd_dimensions"] = absurd_dimensions(base, folder / "absurd.mp4")
    files["zero_fps"] = zero_fps(base, folder / "zero_fps.mp4")
    return files


@pytest.fixture(scope="module")
def client(new_database, launch, tmp_path_factory) -> Iterator[TestClient]:
    folder = tmp_path_factory.mktemp("hostile_service")
    with launch(folder / "data", new_database("sqlite")) as c:
        c.folder = folder  # type: ignore[attr-defined]
        yield c


_GOOD = itertools.count()


@pytest.fixture
def good_clip(tmp_path: Path) -> Callable[[], Path]:
    def make() -> Path:
        n = next(_GOOD)  # a different frame count each time: new bytes, never a duplicate of another test's
        return write_pattern_video(tmp_path / f"good{n}.mp4", (8 + n) / 8, 48, 32, 8, gop=8)

    return make


def send(client: TestClient, payload: bytes | Path, filename: str) -> Any:
    data = payload.read_bytes() if isinstance(payload, Path) else payload
    return client.post("/videos", files={"file": (filename, data, "video/mp4")})


def worker_still_works(api: Any, client: TestClient, good: Path) -> None:
    r = send(client, good, "good.mp4")
    assert r.status_code == 202, r.text
    assert api.wait_job(client, r.json()["job_id"], FAIL_WITHIN_S)["state"] == "ready", (
        "the worker survived the hostile file"
    )


FAILS = {
    "truncated": "truncated or corrupt",
    "truncated_faststart": "truncated or corrupt",
    "text": "not a video",
    "png": "not a video",
    "audio_only": "no video stream",
}


@pytest.mark.parametrize("case", sorted(FAILS))
def test_undecodable_upload_is_a_failed_job_with_its_reason(api, client, corpus, good_clip, case) -> None:
    r = send(client, corpus[case], f"{case}.mp4")
    assert r.status_code == 202, r.text
    job = api.wait_job(client, r.json()["job_id"], FAIL_WITHIN_S)
    assert job["state"] == "failed" and FAILS[case] in job["error"], job
    assert job["attempts"] == 1, "a file that cannot be decoded is not retried"
    video = client.get(f"/videos/{r.json()['video_id']}").json()
    assert video["status"] == "failed" and video["error"] == job["error"]
    worker_still_works(api, client, good_clip())


def test_zero_byte_upload_is_422(client) -> None:
    r = send(client, b"", "zero.mp4")
    assert r.status_code == 422 and "empty" in r.json()["detail"]


@pytest.mark.parametrize("case", ["absurd_dimensions", "zero_fps"])
def test_lying_header_is_indexed_or_failed_cleanly(api, client, corpus, good_clip, case) -> None:
    r = send(client, corpus[case], f"{case}.mp4")
    assert r.status_code == 202, r.text
    job = api.wait_job(client, r.json()["job_id"], FAIL_WITHIN_S)
    if job["state"] == "failed":
        assert job["error"] and "Traceback" not in job["error"], job
    else:
        video = client.get(f"/videos/{r.json()['video_id']}").json()
        assert video["segments"] and all(s["end"] > s["start"] for s in video["segments"]), video
    worker_still_works(api, client, good_clip())


def test_an_hour_long_video_indexes_in_bounded_time(api, client, good_clip, tmp_path) -> None:
    hour = write_pattern_video(tmp_path / "hour.mp4", 3600, 16, 16, 1, gop=250)
    started = time.monotonic()
    r = send(client, hour, "hour.mp4")
    assert r.status_code == 202, r.text
    job = api.wait_job(client, r.json()["job_id"], HOUR_BOUND_S)
    elapsed = time.monotonic() - started
    print(f"1-hour 16x16 1 fps video: {job['state']} in {elapsed:.1f} s")
    assert job["state"] == "ready", job
    video = client.get(f"/videos/{r.json()['video_id']}").json()
    assert video["duration"] == pytest.approx(3600, abs=2) and len(video["segments"]) >= 200
    worker_still_works(api, client, good_clip())


@pytest.mark.parametrize(
    ("filename", "title"),
    [
        ("vidéo 日本語 🎬.mp4", "vidéo 日本語 🎬"),
        ("a" * 1000 + ".mp4", None),
        ("../../../../tmp/evil.mp4", "evil"),
        ("..\\..\\windows\\evil.mp4", "evil"),
        ("/etc/passwd", "passwd"),
        ("name\x00with\x1fcontrols\x7f.mp4", "namewithcontrols"),
    ],
)
def test_odd_filenames_are_display_only(api, client, good_clip, filename, title) -> None:
    clip = good_clip()
    # A hand-made body: httpx would percent-encode the name; a hostile client sends the raw bytes.
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: video/mp4\r\n\r\n"
    ).encode()
    body = head + clip.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()
    r = client.post(
        "/videos", content=body, headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    )
    assert r.status_code == 202, r.text
    assert api.wait_job(client, r.json()["job_id"], FAIL_WITHIN_S)["state"] == "ready"
    video = client.get(f"/videos/{r.json()['video_id']}").json()
    if title is not None:
        assert video["title"] == title
    assert len(video["title"]) <= 255 and "/" not in video["filename"] and "\\" not in video["filename"]
    data = client.folder / "data"  # type: ignore[attr-defined]
    stored = [p for p in data.rglob("*") if p.is_file() and p.read_bytes() == clip.read_bytes()]
    assert [p.relative_to(data).parts[0] for p in stored] == ["videos"], "stored once, under videos/"
    assert stored[0].stem == hashlib.sha256(clip.read_bytes()).hexdigest(), "named by hash"
    assert not Path("/tmp/evil.mp4").exists()


@pytest.mark.parametrize("filename", ["page.mts", "page.html", "page"])
def test_a_page_uploaded_as_a_video_is_never_served_as_a_page(api, client, filename) -> None:
    # A known video suffix (.mts) is kept on the stored copy, others become .bin; either way the type
    # served comes from the bytes, which are no video container: never text/html, whatever the name.
    page = f"<html><script>alert(document.cookie)</script>{filename}</html>".encode() * 20
    r = send(client, page, filename)
    assert r.status_code == 202, r.text
    job = api.wait_job(client, r.json()["job_id"], FAIL_WITHIN_S)
    assert job["state"] == "failed" and "not a video" in job["error"], job
    media = client.get(f"/videos/{r.json()['video_id']}/media")
    assert media.status_code == 200 and media.content == page
    assert media.headers["content-type"] == "application/octet-stream"
    assert media.headers["x-content-type-options"] == "nosniff"


# --- malformed requests -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        b"null",
        b'{"query": 5}',
        b'{"query": "dog", "limit": "ten"}',
        b'{"query": "dog", "limit": 1e309}',
        b'{"query": "dog", "rerank": "maybe"}',
        b'{"query": "dog", "group_by": "frame"}',
        b'{"query": "dog", "filter": []}',
        b'{"query": "dog", "filter": {"video_ids": ["x"]}}',
        b'{"query": "dog", "unexpected": 1}',
        b'{"query": "\\ud800"}',
        b'{"query": "' + b"x" * 2_000 + b'"}',
    ],
)
def test_malformed_search_bodies_are_422(client, body) -> None:
    r = client.post("/search", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, (body[:60], r.status_code, r.text[:300])
    assert r.json()["message"] and r.json()["detail"]


def test_json_nested_too_deep_is_400(client) -> None:
    body = b'{"query": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    r = client.post("/search", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "parsing the body" in r.json()["detail"]


def test_a_huge_search_body_is_refused_unread_and_the_service_stays_up(client) -> None:
    body = b'{"query": "' + b"y" * (16 * 2**20) + b'"}'
    r = client.post("/search", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"], r.status_code
    assert client.post("/search", json={"query": "still here"}).status_code == 200


def test_a_huge_chunked_body_without_a_length_is_refused(client) -> None:
    def chunks():
        yield b'{"query": "'
        for _ in range(64):
            yield b"z" * 65536  # 4 MiB in all, no Content-Length
        yield b'"}'

    r = client.post("/search", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]
    assert client.post("/search", json={"query": "still here"}).status_code == 200


def test_a_body_just_under_the_limit_is_parsed(client) -> None:
    from app.security import MAX_JSON_BODY_BYTES

    body = b'{"query": "' + b"y" * (MAX_JSON_BODY_BYTES - 64) + b'"}'
    r = client.post("/search", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "1000 or fewer" in r.text, r.text[:200]


def test_a_huge_json_ingest_body_is_refused(client) -> None:
    r = client.post(
        "/videos", content=b'{"url": "' + b"a" * 2**20 + b'"}', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413 and "larger than" in r.json()["detail"]


def test_an_ingest_body_over_the_field_limit_but_under_the_body_limit_is_422(client) -> None:
    r = client.post(
        "/videos", content=b'{"url": "' + b"a" * 2**16 + b'"}', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422 and "longer than" in r.json()["detail"]


@pytest.mark.parametrize("value", ["bytes=abc", "bytes=5-1", "bytes=" + ",".join(["0-1"] * 500), "items=0-1"])
def test_odd_range_headers_are_answered_not_crashed(client, good_clip, value) -> None:
    r = send(client, good_clip(), "r.mp4")
    media = client.get(f"/videos/{r.json()['video_id']}/media", headers={"Range": value})
    assert media.status_code in (200, 206, 400, 416), (value[:40], media.status_code)


def _raw(host_port: tuple[str, int], request: bytes) -> bytes:
    with socket.create_connection(host_port, timeout=10) as s:
        s.sendall(request)
        return s.recv(4096)


def test_header_injection_is_refused_at_the_protocol_and_never_echoed(serve, new_database, tmp_path) -> None:
    with serve(tmp_path / "data", new_database("sqlite")) as base:
        host, port = base.removeprefix("http://").split(":")
        where = (host, int(port))
        # A bare CR inside a header value, and obs-fold continuation lines: rejected before the app runs.
        for request in (
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-API-Key: a\rSet-Cookie: b\r\n\r\n",
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Api-Key: a\r\n Set-Cookie: b\r\n\r\n",
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad\x00Name: a\r\n\r\n",
        ):
            reply = _raw(where, request)
            assert reply.startswith(b"HTTP/1.1 400"), reply[:80]
        # A path with an encoded CRLF reaches the router as text and is never reflected into a header.
        reply = _raw(where, b"GET /videos/1%0d%0aSet-Cookie:%20x HTTP/1.1\r\nHost: x\r\n\r\n")
        head = reply.split(b"\r\n\r\n")[0].lower()
        assert reply.startswith(b"HTTP/1.1 422") and b"set-cookie" not in head, reply[:200]


def test_a_lone_surrogate_in_an_ingest_title_is_422(client) -> None:
    body = '{"path": "/nowhere/a.mp4", "title": "\\udc80"}'
    r = client.post("/videos", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "surrogate" in r.json()["message"], r.text


@pytest.mark.parametrize(
    "body", [b'{"path": "/nowhere/\xff\xfe.mp4"}', b'{"url": "https://example.com/\xc3("}', b"\xff"]
)
def test_an_ingest_body_that_is_not_utf8_is_422_saying_where(client, body) -> None:
    r = client.post("/videos", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith("Invalid JSON:") and "line 1 column" in r.json()["message"]
    assert "\\xff" in r.text or "\\xc3" in r.text, "the bytes are echoed escaped, not dropped"
