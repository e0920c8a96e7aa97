"""POST /videos {"url"}: fetched from a local server (private addresses allowed) or refused, with limits."""

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

from app.deps import get_fetcher
from app.url_fetch import UrlFetcher


class _Handler(http.server.BaseHTTPRequestHandler):
    clip: bytes = b""

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
    handler = type("Handler", (_Handler,), {"clip": clips[0]["path"].read_bytes()})
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


def test_url_from_an_allowed_private_server(fetching, server, api):
    client, _ = fetching
    r = client.post("/videos", json={"url": f"{server}/clip.mp4", "meta": {"from": "test"}})
    assert r.status_code == 202, r.text
    assert api.wait_job(client, r.json()["job_id"])["state"] == "ready"
    video = client.get(f"/videos/{r.json()['video_id']}").json()
    assert video["title"] == "clip" and video["meta"] == {"from": "test"}
    again = client.post("/videos", json={"url": f"{server}/redirect", "title": "via redirect"})
    assert again.status_code == 200 and again.json()["duplicate_of"] == r.json()["video_id"]


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
    ("path", "status", "needle"),
    [
        ("/missing.mp4", 502, "404"),
        ("/loop", 502, "redirects"),
        ("/slow.mp4", 502, "did not answer"),
        ("/big.mp4", 413, "TVS_MAX_UPLOAD_BYTES"),
    ],
)
def test_url_failures(fetching, server, path, status, needle):
    client, data = fetching
    before = client.get("/videos").json()["count"]
    r = client.post("/videos", json={"url": f"{server}{path}"})
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]
    assert _incoming(data) == []
    assert client.get("/videos").json()["count"] == before


def test_each_redirect_hop_is_checked_and_connections_are_pinned(refusing):
    """A public host redirecting to a private one is refused at the second hop."""
    seen: list[httpx.Request] = []
    public = "93.184.216.34"

    async def resolver(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [ipaddress.ip_address(public if host == "videos.example" else "127.0.0.1")]

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(302, headers={"Location": "http://internal.example/admin"})

    fetcher = UrlFetcher(resolver=resolver, transport=httpx.MockTransport(answer))
    refusing.app.dependency_overrides[get_fetcher] = lambda: fetcher
    try:
        r = refusing.post("/videos", json={"url": "http://videos.example/clip.mp4"})
    finally:
        refusing.app.dependency_overrides.clear()
    assert r.status_code == 403 and "internal.example" in r.json()["detail"]
    assert len(seen) == 1  # the private hop was never contacted
    assert seen[0].url.host == public and seen[0].headers["host"] == "videos.example"
