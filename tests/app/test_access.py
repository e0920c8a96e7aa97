"""Private by default: every route but /health and the demo page needs a key; read-only keys, sessions, public
archives, and /metrics on a port of its own."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers.ports import free_port
from pydantic import ValidationError

from app.access import SESSION_COOKIE, Keys, issue_session
from app.metrics_server import MetricsServerError
from app.settings import Settings

KEY = "write-key-" + "w" * 22
READ = "read-key-" + "r" * 22
PUBLIC_PATHS = {"/health", "/"}
# What each route class answers a key that may do it: (method, path template) -> status.
READS = {
    ("POST", "/search"): 200,
    ("GET", "/videos"): 200,
    ("GET", "/videos/{video_id}"): 200,
    ("GET", "/videos/{video_id}/media"): 200,
    ("GET", "/segments/{segment_id}/thumbnail"): 200,
    ("GET", "/demo/examples"): 200,
    ("GET", "/docs"): 200,
    ("GET", "/redoc"): 200,
    ("GET", "/openapi.json"): 200,
}
KEYED_READS = {("GET", "/jobs/{job_id}"): 200, ("GET", "/metrics"): 200, ("POST", "/session"): 200}
WRITES = {("POST", "/videos"), ("DELETE", "/videos/{video_id}")}


@contextmanager
def holding_key(client: TestClient, key: str) -> Iterator[TestClient]:
    """The shared `api` helpers send no key: lend them one."""
    client.headers["X-API-Key"] = key
    try:
        yield client
    finally:
        del client.headers["X-API-Key"]


def ingest_one(client: TestClient, api: Any, path: Any) -> dict[str, int]:
    with holding_key(client, KEY):
        r = api.upload(client, path)
        assert r.status_code == 202, r.text
        video_id, job_id = r.json()["video_id"], r.json()["job_id"]
        assert api.wait_job(client, job_id)["state"] == "ready"
        segment_id = client.get(f"/videos/{video_id}").json()["segments"][0]["id"]
    return {"video_id": video_id, "segment_id": segment_id, "job_id": job_id}


def call(
    client: TestClient, method: str, template: str, ids: dict[str, int], **headers: str
) -> httpx.Response:
    url = template.format(**ids)
    if (method, template) == ("POST", "/search"):
        return client.post(url, json={"query": "a red square", "limit": 3}, headers=headers)
    if (method, template) == ("POST", "/videos"):
        return client.post(url, json={"path": "/nowhere/a.mp4"}, headers=headers)
    return client.request(method, url, headers=headers)


def app_routes(client: TestClient) -> set[tuple[str, str]]:
    """Every operation the schema lists, and the routes it leaves out (the page and the reference)."""
    schema = client.app.openapi()  # type: ignore[attr-defined]
    listed = {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops}
    return listed | {("GET", "/"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json")}


def test_every_route_but_health_and_the_page_needs_a_key(service, clips, api) -> None:
    with service(api_key=KEY, read_api_key=READ) as client:
        ids = ingest_one(client, api, clips[0]["path"])
        routes = app_routes(client)
        assert set(READS) | set(KEYED_READS) | WRITES <= routes
        for method, path in sorted(routes):
            r = call(client, method, path, ids)
            if path in PUBLIC_PATHS:
                assert r.status_code == 200, (method, path, r.status_code)
            else:
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                assert r.headers["www-authenticate"] == "Bearer" and "X-API-Key" in r.json()["detail"]
        for asset in ("/static/app.js", "/static/style.css"):
            assert client.get(asset).status_code == 200
        assert client.get("/health").json()["public_read"] is False

        # The read-only key reads everything, as X-API-Key or Bearer, and may not write (403, not 401).
        for headers in ({"X-API-Key": READ}, {"Authorization": f"Bearer {READ}"}):
            for (method, path), expected in {**READS, **KEYED_READS}.items():
                r = call(client, method, path, ids, **headers)
                assert r.status_code == expected, (method, path, r.status_code, r.text)
            for method, path in WRITES:
                r = call(client, method, path, ids, **headers)
                assert r.status_code == 403 and "read-only" in r.json()["detail"], (method, path, r.text)
        assert api.upload(client, clips[1]["path"], **{"X-API-Key": READ}).status_code == 403
        assert client.get("/videos", headers={"X-API-Key": READ + "x"}).status_code == 401
        assert client.get("/videos", headers={"X-API-Key": READ}).json()["count"] == 1

        # The write key does everything.
        for (method, path), expected in {**READS, **KEYED_READS}.items():
            assert call(client, method, path, ids, **{"X-API-Key": KEY}).status_code == expected, path
        r = call(client, "POST", "/videos", ids, **{"X-API-Key": KEY})
        assert r.status_code == 403 and "TVS_ALLOWED_ROOTS" in r.json()["detail"], r.text  # past the key
        r = client.delete(f"/videos/{ids['video_id']}", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200


def test_openapi_declares_the_schemes_on_the_protected_operations(service) -> None:
    with service(api_key=KEY) as client:
        schema = client.get("/openapi.json", headers={"X-API-Key": KEY}).json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["APIKey"] == {**schemes["APIKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["Bearer"]["scheme"] == "bearer"
    assert schemes["Session"] == {**schemes["Session"], "in": "cookie", "name": SESSION_COOKIE}
    paths = schema["paths"]
    reading = [{"APIKey": []}, {"Bearer": []}, {"Session": []}]
    for path, method in [("/search", "post"), ("/videos/{video_id}/media", "get"), ("/jobs/{job_id}", "get")]:
        assert paths[path][method]["security"] == reading, path
        assert "401" in paths[path][method]["responses"]
    for path, method in [("/videos", "post"), ("/videos/{video_id}", "delete")]:
        assert paths[path][method]["security"] == [{"APIKey": []}, {"Bearer": []}], "a cookie never writes"
        assert {"401", "403"} <= set(paths[path][method]["responses"])
    assert "security" not in paths["/health"]["get"]


def test_a_session_cookie_lets_media_tags_read_but_never_write(service, clips, api) -> None:
    with service(api_key=KEY, read_api_key=READ, session_ttl_s=120) as client:
        ids = ingest_one(client, api, clips[0]["path"])
        media, thumb = f"/videos/{ids['video_id']}/media", f"/segments/{ids['segment_id']}/thumbnail"
        assert client.get(media).status_code == 401
        r = client.post("/session", headers={"X-API-Key": "wrong"})
        assert r.status_code == 401 and "set-cookie" not in r.headers
        r = client.post("/session", headers={"X-API-Key": READ})
        assert r.status_code == 200 and r.json() == {"access": "read", "expires_in_s": 120}
        cookie = r.headers["set-cookie"].lower()
        for attribute in ("httponly", "samesite=strict", "max-age=120", "path=/"):
            assert attribute in cookie, cookie
        assert READ.lower() not in cookie, "the cookie is a signed expiry, not the key"
        # No header from here on: what a <video> or <img> tag sends.
        ranged = client.get(media, headers={"Range": "bytes=0-99"})
        assert ranged.status_code == 206 and len(ranged.content) == 100
        thumbnail = client.get(thumb)
        assert thumbnail.status_code == 200 and thumbnail.headers["cache-control"].startswith("private")
        assert client.post("/search", json={"query": "a red square"}).status_code == 200
        assert client.get("/docs").status_code == 200 and client.get("/openapi.json").status_code == 200
        assert api.upload(client, clips[1]["path"]).status_code == 401
        assert client.delete(f"/videos/{ids['video_id']}").status_code == 401
        # A wrong key beside a good cookie is still a wrong key.
        assert client.get(media, headers={"X-API-Key": "wrong"}).status_code == 401
        # The write key's session reads too, and still does not write.
        assert client.post("/session", headers={"X-API-Key": KEY}).json()["access"] == "write"
        assert client.delete(f"/videos/{ids['video_id']}").status_code == 401

        now = time.time()
        secret = Keys(KEY, READ).session_secret()
        expires, _, signature = issue_session(secret, now, 120).partition(".")
        for token, works in [
            (issue_session(secret, now, 120), True),
            (issue_session(secret, now - 200, 120), False),  # expired
            (f"{int(expires) + 3600}.{signature}", False),  # expiry moved
            (issue_session(Keys(KEY + "x", READ).session_secret(), now, 120), False),  # another write key
            (issue_session(Keys(KEY, READ + "x").session_secret(), now, 120), False),  # another read key
            ("garbage", False),
            ("", False),
        ]:
            client.cookies.clear()
            client.cookies.set(SESSION_COOKIE, token)
            assert client.get(thumb).status_code == (200 if works else 401), token


def test_public_read_opens_the_library_but_not_jobs_metrics_or_writes(service, clips, api) -> None:
    with service(api_key=KEY, read_api_key=READ, public_read=True) as client:
        ids = ingest_one(client, api, clips[0]["path"])
        health = client.get("/health").json()
        assert health["public_read"] is True and health["auth_required"] is True
        for (method, path), expected in READS.items():
            r = call(client, method, path, ids)
            assert r.status_code == expected, (method, path, r.status_code)
        thumb = client.get(f"/segments/{ids['segment_id']}/thumbnail")
        assert thumb.headers["cache-control"].startswith("public")
        for method, path in [("GET", "/jobs/{job_id}"), ("GET", "/metrics"), *WRITES]:
            assert call(client, method, path, ids).status_code == 401, path
        assert call(client, "DELETE", "/videos/{video_id}", ids, **{"X-API-Key": READ}).status_code == 403
        assert call(client, "GET", "/jobs/{job_id}", ids, **{"X-API-Key": READ}).status_code == 200


def test_metrics_on_their_own_port_over_real_sockets(serve, new_database, tmp_path) -> None:
    port = free_port()
    with serve(tmp_path / "data", new_database("sqlite"), api_key=KEY, metrics_port=port) as base:
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        first = httpx.get(
            metrics_url
        )  # no key: the port is the boundary (TVS_METRICS_HOST, a private network)
        assert first.status_code == 200 and first.headers["content-type"].startswith("text/plain")
        assert "tvs_index_size 0.0" in first.text
        assert (
            httpx.post(f"{base}/search", json={"query": "x"}, headers={"X-API-Key": KEY}).status_code == 200
        )
        assert 'route="/search",status="200"' in httpx.get(metrics_url).text, (
            "it sees the main port's requests"
        )
        assert httpx.get(f"{base}/metrics", headers={"X-API-Key": KEY}).status_code == 404, (
            "moved, not copied"
        )
        for other in ("/search", "/health", "/videos", "/docs"):
            assert httpx.get(f"http://127.0.0.1:{port}{other}").status_code == 404, other
    with pytest.raises(httpx.ConnectError):
        httpx.get(metrics_url, timeout=2)


def test_a_taken_metrics_port_stops_the_start_up_with_its_address(service) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsServerError, match=f"127.0.0.1:{port} .*TVS_METRICS_PORT"):
            with service(metrics_port=port):
                pass


def test_access_settings_refuse_what_would_guard_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="TVS_READ_API_KEY is set but TVS_API_KEY is not"):
        Settings(read_api_key=READ)
    with pytest.raises(ValidationError, match="must differ"):
        Settings(api_key=KEY, read_api_key=KEY)
    with pytest.raises(ValidationError, match="TVS_READ_API_KEY to be at least 16"):
        Settings(env="production", api_key=KEY, read_api_key="short")
    monkeypatch.setenv("TVS_API_KEY", KEY)
    monkeypatch.setenv("TVS_READ_API_KEY", " ")
    monkeypatch.setenv("TVS_PUBLIC_READ", "true")
    monkeypatch.setenv("TVS_METRICS_PORT", "9100")
    s = Settings()
    assert s.read_api_key is None and s.public_read is True and s.reads_are_public is True
    assert (s.metrics_host, s.metrics_port, s.session_ttl_s) == ("127.0.0.1", 9100, 12 * 3600)
    assert Settings(api_key=None).reads_are_public is True
    assert Settings(public_read=False).reads_are_public is False
