"""POST /videos {"url"}: 202 with a job at once; the job downloads from a local server (private addresses
allowed) with its bytes on the job, or fails with the reason; refused addresses are a 403 at once."""

from __future__ import annotations

import http.server
import ipaddress
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from indexer.url_fetch import UrlFetcher, UrlRefusedError


class _Handler(http.server.BaseHTTPRequestHandler):
    clip: bytes = b""
    other: bytes = b""  # another clip, so that its download is no duplicate of the first

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the service hung up on purpose (size cap, timeout)

    def _route(self) -> None:
        if self.path == "/clip.mp4":
            self._send(200, self.clip, {"Content-Type": "video/mp4"})
        elif self.path == "/redirect":
            self._send(302, b"", {"Location": "/clip.mp4"})
        elif self.path == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif self.path == "/slow.mp4":
            time.sleep(3)
            self._send(200, self.clip, {})
        elif self.path == "/notes.mp4":
            self._send(200, b"shopping list: eggs, milk, bread\n" * 40, {"Content-Type": "video/mp4"})
        elif self.path == "/trickle.mp4":
            # Slow enough to be cancelled mid-download: the clip in 20 pieces, 0.25 s apart.
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.other)))
            self.end_headers()
            step = len(self.other) // 20 + 1
            for start in range(0, len(self.other), step):
                self.wfile.write(self.other[start : start + step])
                self.wfile.flush()
                time.sleep(0.25)
        elif self.path == "/big.mp4":
            # No Content-Length: the cap has to bite while streaming.
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 65536)
        else:
            self._send(404, b"not here", {})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server(clips) -> Iterator[str]:
    files = {"clip": clips[0]["path"].read_bytes(), "other": clips[1]["path"].read_bytes()}
    handler = type("Handler", (_Handler,), files)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fetching(request, new_database, launch, tmp_path_factory) -> Iterator[tuple[TestClient, Path]]:
    """One app per backend allowed to fetch from the local server, with tight limits to hit."""
    folder = tmp_path_factory.mktemp("fetching")
    # 1.5 s leaves a loaded machine room to answer the quick routes; /slow.mp4 sleeps 3 s, past it.
    limits = dict(url_timeout_s=1.5, url_max_redirects=3, max_upload_bytes=1_000_000)
    with launch(folder / "data", new_database(request.param), allow_private_urls=True, **limits) as client:
        yield client, folder / "data"


@pytest.fixture(scope="module")
def refusing(new_database, launch, tmp_path_factory) -> Iterator[TestClient]:
    """The default: private addresses refused (refusals touch no database, so one backend is enough)."""
    with launch(tmp_path_factory.mktemp("refusing") / "data", new_database("sqlite")) as client:
        yield client


def _incoming(data: Path) -> list[Path]:
    folder = data / "incoming"
    return [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []


def test_url_answers_202_at_once_and_the_job_downloads_it(fetching, server, clips, api):
    client, data = fetching
    size = clips[0]["path"].stat().st_size
    r = client.post("/videos", json={"url": f"{server}/clip.mp4", "meta": {"from": "test"}})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["video_id"] is None and body["status"] == "queued"
    assert r.headers["location"] == f"/jobs/{body['job_id']}"
    job = api.wait_job(client, body["job_id"])
    assert job["state"] == "ready", job
    assert job["url"] == f"{server}/clip.mp4" and job["bytes_done"] == job["bytes_total"] == size
    video = client.get(f"/videos/{job['video_id']}").json()
    assert video["title"] == "clip" and video["meta"] == {"from": "test"} and video["status"] == "ready"
    assert _incoming(data) == []
    # The same bytes again (through a redirect): a job of its own, done as the video already there.
    again = client.post("/videos", json={"url": f"{server}/redirect", "title": "via redirect"})
    assert again.status_code == 202, again.text
    dup = api.wait_job(client, again.json()["job_id"])
    assert dup["state"] == "ready" and dup["video_id"] == job["video_id"]
    assert client.get("/videos").json()["count"] == 1


@pytest.mark.parametrize(
    "url",
    [
        "{server}/clip.mp4",
        "http://localhost:{port}/clip.mp4",
        "http://[::1]:{port}/clip.mp4",
        "http://10.1.2.3/clip.mp4",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:127.0.0.1]:{port}/clip.mp4",
        "http://0.0.0.0:{port}/clip.mp4",
    ],
)
def test_private_addresses_are_refused_by_default(refusing, server, url):
    port = server.rsplit(":", 1)[1]
    r = refusing.post("/videos", json={"url": url.format(server=server, port=port)})
    assert r.status_code == 403, r.text
    assert "public addresses" in r.json()["detail"]
    assert refusing.get("/videos").json()["count"] == 0


@pytest.mark.parametrize(
    ("path", "needle", "retried"),
    [
        ("/missing.mp4", "HTTP 404", False),
        ("/loop", "redirects", False),
        ("/slow.mp4", "did not answer", True),
        ("/big.mp4", "TVS_MAX_UPLOAD_BYTES", False),
        ("/notes.mp4", "not a video", False),
    ],
)
def test_download_failures_end_the_job_with_the_reason(fetching, server, api, path, needle, retried):
    client, data = fetching
    before = client.get("/videos").json()["count"]
    r = client.post("/videos", json={"url": f"{server}{path}"})
    assert r.status_code == 202, r.text
    # A timeout is worth another try (back in the queue with the reason); the others fail at once.
    job = api.wait_job_until(
        client, r.json()["job_id"], lambda j: j["state"] in ("failed", "queued") and j["error"]
    )
    assert needle in job["error"], job
    assert job["state"] == ("queued" if retried else "failed") and job["attempts"] == 1
    assert job["video_id"] is None
    assert _incoming(data) == []
    assert client.get("/videos").json()["count"] == before
    if retried:
        assert client.delete(f"/jobs/{job['id']}").json()["state"] == "cancelled"  # no more tries


def test_a_download_can_be_cancelled_and_retried(fetching, server, api):
    client, data = fetching
    job_id = client.post("/videos", json={"url": f"{server}/trickle.mp4", "title": "trickled"}).json()[
        "job_id"
    ]
    running = api.wait_job_until(client, job_id, lambda j: j["state"] == "downloading" and j["bytes_done"])
    assert 0 < running["bytes_done"] < running["bytes_total"] and 0 < running["progress"] < 1
    cancelled = client.delete(f"/jobs/{job_id}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled" and "cancelled" in cancelled.json()["error"]
    assert client.delete(f"/jobs/{job_id}").status_code == 409  # already finished
    # The worker notices within a chunk or two and drops the partial file; the job stays cancelled.
    deadline = time.monotonic() + 10
    while _incoming(data) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _incoming(data) == []
    assert client.get(f"/jobs/{job_id}").json()["state"] == "cancelled"
    retried = client.post(f"/jobs/{job_id}/retry")
    assert retried.status_code == 200 and retried.json()["state"] == "queued", retried.text
    done = api.wait_job(client, job_id)
    assert done["state"] == "ready" and done["title"] == "trickled", done
    assert client.get(f"/videos/{done['video_id']}").json()["status"] == "ready"
    assert client.post(f"/jobs/{job_id}/retry").status_code == 409  # a ready job is not retried


def test_each_redirect_hop_is_checked_and_connections_are_pinned(tmp_path):
    """A public host redirecting to a private one is refused at the second hop, inside the download."""
    seen: list[httpx.Request] = []
    public = "93.184.216.34"

    async def resolver(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [ipaddress.ip_address(public if host == "videos.example" else "127.0.0.1")]

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(302, headers={"Location": "http://internal.example/admin"})

    fetcher = UrlFetcher(resolver=resolver, transport=httpx.MockTransport(answer))
    with pytest.raises(UrlRefusedError, match="internal.example"):
        fetcher.download("http://videos.example/clip.mp4", tmp_path, 1_000_000)
    assert len(seen) == 1  # the private hop was never contacted
    assert seen[0].url.host == public and seen[0].headers["host"] == "videos.example"
    assert list(tmp_path.iterdir()) == []
