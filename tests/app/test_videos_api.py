"""Ingestion and library endpoints through HTTP: uploads, paths, limits, jobs, listing, deletion, media, thumbs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from synth.media import write_format_samples

BOUNDARY = "tvs-test-boundary"


def _multipart(payload: bytes, name: str = "clip.mp4", field: str = "file") -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        "Content-Type: video/mp4\r\n\r\n"
    ).encode()
    return head + payload + f"\r\n--{BOUNDARY}--\r\n".encode()


@pytest.fixture(scope="module")
def roots(tmp_path_factory, clips) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("roots")
    allowed = base / "library"
    (allowed / "sub").mkdir(parents=True)
    outside = base / "outside"
    outside.mkdir()
    (allowed / "sub" / "clip.mp4").write_bytes(clips[2]["path"].read_bytes())
    (outside / "secret.mp4").write_bytes(clips[3]["path"].read_bytes())
    os.symlink(outside / "secret.mp4", allowed / "link.mp4")
    os.symlink(outside, allowed / "linkdir")
    return {"allowed": allowed, "outside": outside}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared(request, new_database, launch, tmp_path_factory, roots) -> Iterator[TestClient]:
    """One app per backend for the tests that only get refused (so nothing they do is kept)."""
    folder = tmp_path_factory.mktemp("shared")
    with launch(folder / "data", new_database(request.param), allowed_roots=[roots["allowed"]]) as client:
        yield client


def _incoming(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "data" / "incoming"
    return [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []


@pytest.mark.parametrize("vector_backend", ["faiss", "milvus"], indirect=True)
def test_upload_then_duplicate(service, clips, api):
    with service() as client:
        first = api.upload(client, clips[0]["path"], title="My clip")
        assert first.status_code == 202, first.text
        body = first.json()
        assert body["status"] == "pending" and body["duplicate_of"] is None and body["job_id"] > 0
        again = api.upload(client, clips[0]["path"])
        assert again.status_code == 200
        assert again.json()["duplicate_of"] == body["video_id"] == again.json()["video_id"]
        job = api.wait_job(client, body["job_id"])
        assert job["state"] == "ready" and job["progress"] == 1.0 and job["error"] is None
        video = client.get(f"/videos/{body['video_id']}").json()
        assert video["title"] == "My clip" and video["status"] == "ready"
        assert video["duration"] == pytest.approx(3.0, abs=0.2)
        assert len(video["segments"]) == 1 and video["latest_job"]["id"] == body["job_id"]


def test_upload_title_defaults_to_the_file_name_and_meta_is_kept(service, clips):
    with service() as client:
        with open(clips[1]["path"], "rb") as f:
            r = client.post(
                "/videos",
                files={"file": ("../../etc/Holiday clip.mp4", f, "video/mp4")},
                data={"meta": '{"camera": "front door"}'},
            )
        assert r.status_code == 202, r.text
        video = client.get(f"/videos/{r.json()['video_id']}").json()
        assert video["title"] == "Holiday clip"
        assert video["meta"] == {"camera": "front door"}


def test_upload_over_the_cap_is_413_and_leaves_nothing_behind(service, clips, tmp_path):
    size = clips[0]["path"].stat().st_size
    with service(max_upload_bytes=size // 2) as client:
        with open(clips[0]["path"], "rb") as f:
            r = client.post("/videos", files={"file": ("a.mp4", f, "video/mp4")})
        assert r.status_code == 413
        assert "TVS_MAX_UPLOAD_BYTES" in r.json()["detail"]
        # Chunked, with no Content-Length: the cap must bite mid-stream.
        body = _multipart(clips[0]["path"].read_bytes())
        chunks = (body[i : i + 1024] for i in range(0, len(body), 1024))
        r = client.post(
            "/videos", content=chunks, headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        )
        assert r.status_code == 413
        # A declared length far over the cap is refused before a byte is read.
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Content-Length": str(10**9)}
        assert client.post("/videos", content=b"", headers=headers).status_code == 413
        assert _incoming(tmp_path) == []
        assert client.get("/videos").json()["count"] == 0


@pytest.mark.parametrize(
    ("content", "content_type", "status", "needle"),
    [
        (b"not multipart at all", f"multipart/form-data; boundary={BOUNDARY}", 422, "malformed"),
        (_multipart(b"abc")[:-12], f"multipart/form-data; boundary={BOUNDARY}", 422, "ended early"),
        (
            _multipart(b"abc", field="video"),
            f"multipart/form-data; boundary={BOUNDARY}",
            422,
            "unexpected form field",
        ),
        (_multipart(b""), f"multipart/form-data; boundary={BOUNDARY}", 422, "empty"),
        (b"--x--\r\n", "multipart/form-data", 422, "boundary"),
        (b"raw video bytes", "video/mp4", 415, "multipart/form-data"),
        (b"{not json", "application/json", 422, "json"),
        (b'{"path": "/a", "url": "http://example.com/a.mp4"}', "application/json", 422, "exactly one"),
        (b"{}", "application/json", 422, "exactly one"),
        (b'{"url": "file:///etc/passwd"}', "application/json", 422, "url"),
        (b'{"url": "ftp://example.com/a.mp4"}', "application/json", 422, "url"),
    ],
)
def test_malformed_ingest_requests(shared, content, content_type, status, needle):
    r = shared.post("/videos", content=content, headers={"Content-Type": content_type})
    assert r.status_code == status, r.text
    body = r.json()
    text = body.get("message") or body["detail"]
    assert needle.lower() in str(text).lower()
    assert shared.get("/videos").json()["count"] == 0


def test_upload_without_a_file_part_is_422(shared):
    r = shared.post("/videos", files={"title": (None, "just a title")})
    assert r.status_code == 422 and "file" in r.json()["detail"]


def test_not_a_video_becomes_a_failed_job_with_the_reason(service, hostile, api):
    with service() as client:
        r = api.upload(client, hostile["text"])
        assert r.status_code == 202, r.text
        job = api.wait_job(client, r.json()["job_id"])
        assert job["state"] == "failed"
        assert job["error"] and "video" in job["error"].lower()
        video = client.get(f"/videos/{r.json()['video_id']}").json()
        assert video["status"] == "failed" and video["error"]


def test_path_ingestion_inside_an_allowed_root(service, roots, api):
    with service(allowed_roots=[roots["allowed"]]) as client:
        r = client.post(
            "/videos", json={"path": str(roots["allowed"] / "sub" / "clip.mp4"), "title": "From disk"}
        )
        assert r.status_code == 202, r.text
        assert api.wait_job(client, r.json()["job_id"])["state"] == "ready"
        media = client.get(f"/videos/{r.json()['video_id']}/media")
        assert (
            media.status_code == 200 and media.content == (roots["allowed"] / "sub" / "clip.mp4").read_bytes()
        )
        again = client.post(
            "/videos", json={"path": str(roots["allowed"] / "sub" / ".." / "sub" / "clip.mp4")}
        )
        assert again.status_code == 200 and again.json()["duplicate_of"] == r.json()["video_id"]


@pytest.mark.parametrize(
    "relative",
    [
        "../outside/secret.mp4",
        "sub/../../outside/secret.mp4",
        "link.mp4",
        "linkdir/secret.mp4",
        "../outside/nope.mp4",
    ],
)
def test_paths_leaving_the_allowed_root_are_403(shared, roots, relative):
    r = shared.post("/videos", json={"path": f"{roots['allowed']}/{relative}"})
    assert r.status_code == 403, r.text
    assert "TVS_ALLOWED_ROOTS" in r.json()["detail"]
    assert shared.get("/videos").json()["count"] == 0


def test_path_errors(shared, roots):
    assert shared.post("/videos", json={"path": str(roots["allowed"] / "missing.mp4")}).status_code == 404
    assert shared.post("/videos", json={"path": str(roots["allowed"] / "sub")}).status_code == 404
    assert shared.post("/videos", json={"path": "sub/clip.mp4"}).status_code == 422
    assert shared.post("/videos", json={"path": f"{roots['allowed']}/a\x00b"}).status_code == 422
    # A lone surrogate (legal JSON escape, not encodable as a file name).
    body = '{"path": "' + str(roots["allowed"]) + '/\\ud800.mp4"}'
    assert (
        shared.post("/videos", content=body, headers={"Content-Type": "application/json"}).status_code == 422
    )


def test_path_ingestion_is_off_without_allowed_roots(service, roots):
    with service() as client:
        r = client.post("/videos", json={"path": str(roots["allowed"] / "sub" / "clip.mp4")})
        assert r.status_code == 403


def test_list_videos_paginates(service, clips, api):
    with service(worker=False) as client:
        ids = [api.upload(client, c["path"]).json()["video_id"] for c in clips[:5]]
        page = client.get("/videos", params={"limit": 2}).json()
        assert page["count"] == 5 and page["limit"] == 2 and page["offset"] == 0
        assert [v["id"] for v in page["data"]] == ids[::-1][:2]
        rest = client.get("/videos", params={"offset": 4, "limit": 2}).json()
        assert [v["id"] for v in rest["data"]] == [ids[0]]
        assert client.get("/videos", params={"status": "pending"}).json()["count"] == 5
        assert client.get("/videos", params={"status": "ready"}).json()["count"] == 0
        for bad in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"status": "lost"}):
            assert client.get("/videos", params=bad).status_code == 422


def test_unknown_ids_are_404(shared):
    for url in ("/videos/999", "/jobs/999", "/videos/999/media", "/segments/999/thumbnail"):
        r = shared.get(url)
        assert r.status_code == 404 and r.json()["detail"], url
    assert shared.delete("/videos/999").status_code == 404
    assert shared.get("/videos/0").status_code == 422
    assert shared.get(f"/videos/{2**63}").status_code == 422


@pytest.mark.parametrize("vector_backend", ["faiss", "milvus"], indirect=True)
def test_delete_removes_the_video_from_search_at_once(service, clips, api):
    with service() as client:
        keep, gone = api.ingest(client, [clips[0]["path"], clips[1]["path"]])
        assert {h["video_id"] for h in api.search(client).json()["results"]} == {keep, gone}
        r = client.delete(f"/videos/{gone}")
        assert r.status_code == 200 and r.json() == {"video_id": gone, "segments_removed": 1}
        assert {h["video_id"] for h in api.search(client).json()["results"]} == {keep}
        assert client.get(f"/videos/{gone}").status_code == 404
        assert client.get(f"/videos/{gone}/media").status_code == 404
        assert [v["id"] for v in client.get("/videos").json()["data"]] == [keep]
        assert client.delete(f"/videos/{gone}").status_code in (200, 404)
        # Uploading the same bytes again brings it back.
        again = api.upload(client, clips[1]["path"])
        assert again.status_code == 202
        assert api.wait_job(client, again.json()["job_id"])["state"] == "ready"


def test_media_supports_range_requests(service, clips, api):
    data = clips[0]["path"].read_bytes()
    with service(worker=False) as client:
        video_id = api.upload(client, clips[0]["path"]).json()["video_id"]
        full = client.get(f"/videos/{video_id}/media")
        assert full.status_code == 200 and full.content == data
        assert full.headers["accept-ranges"] == "bytes" and full.headers["content-type"] == "video/mp4"
        part = client.get(f"/videos/{video_id}/media", headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == data[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
        tail = client.get(f"/videos/{video_id}/media", headers={"Range": "bytes=-50"})
        assert tail.status_code == 206 and tail.content == data[-50:]
        bad = client.get(f"/videos/{video_id}/media", headers={"Range": f"bytes={len(data) + 10}-"})
        assert bad.status_code == 416


def test_media_is_served_as_its_container_whatever_its_name(service, api, tmp_path):
    samples = write_format_samples(tmp_path / "samples")
    expected = {
        "camcorder.mts": "video/mp2t",
        "desktop.wmv": "video/x-ms-asf",
        "phone.3gp": "video/3gpp",
        "no_suffix": "video/mp4",  # stored as .bin: an upload keeps only a known video suffix
        "renamed.dat": "video/mp4",  # indexed in place under an allowed root
    }
    with service(allowed_roots=[str(tmp_path / "samples")]) as client:
        accepted = {name: api.upload(client, samples[name]) for name in list(expected)[:4]}
        accepted["renamed.dat"] = client.post("/videos", json={"path": str(samples["renamed.dat"])})
        for name, r in accepted.items():
            assert r.status_code == 202, (name, r.text)
            assert api.wait_job(client, r.json()["job_id"])["state"] == "ready", name
            media = client.get(f"/videos/{r.json()['video_id']}/media")
            assert media.status_code == 200 and media.content == samples[name].read_bytes()
            assert media.headers["content-type"] == expected[name], name
        # A library file that is no video is served as bytes, not as the type its name suggests.
        page = tmp_path / "samples" / "page.html"
        page.write_text("<html><script>alert(document.cookie)</script></html>\n" * 20)
        r = client.post("/videos", json={"path": str(page)})
        assert r.status_code == 202 and api.wait_job(client, r.json()["job_id"])["state"] == "failed"
        media = client.get(f"/videos/{r.json()['video_id']}/media")
        assert media.status_code == 200 and media.headers["content-type"] == "application/octet-stream"
    stored = sorted(p.suffix for p in (tmp_path / "data" / "videos").rglob("*") if p.is_file())
    assert stored == [".3gp", ".bin", ".mts", ".wmv"]
