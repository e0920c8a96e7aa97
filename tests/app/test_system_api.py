"""Health, metrics, API keys, CORS, security headers, the demo page, settings and start-up refusals."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import faiss
import pytest
from fastapi.testclient import TestClient
from helpers.postgres import create_postgres_database, drop_postgres_database
from pydantic import ValidationError

from app.main import create_app
from app.settings import Settings
from indexer.db import DatabaseNotMigratedError, make_engine, upgrade_database
from indexer.index_device import IndexDeviceError
from indexer.live_index import IndexConfigError

KEY = "k" * 24


def test_health_reports_model_device_and_index(service, clips, api):
    with service() as client:
        body = client.get("/health").json()
        assert body["status"] == "ok" and body["ready"] is True
        assert body["model"]["id"].startswith("tiny-") and body["model"]["device"] == "cpu"
        assert body["model"]["top_k"] == 4 and body["model"]["num_frames"] == 4 and body["model"]["dim"] == 32
        assert body["index"]["size"] == 0 and body["index"]["type"] == "Flat"
        assert (body["index"]["nprobe"], body["index"]["ef_search"], body["index"]["rerank"]) == (
            None,
            None,
            0,
        )
        assert body["worker"] is True and body["auth_required"] is False
        api.ingest(client, [clips[0]["path"]])
        assert client.get("/health").json()["index"]["size"] == 1


def test_health_is_503_until_the_lifespan_has_loaded_everything():
    client = TestClient(create_app(Settings(model="tiny")))  # no `with`: the lifespan never runs
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["ready"] is False and r.json()["status"] == "starting"
    assert client.post("/search", json={"query": "dog"}).status_code == 503


def test_metrics_expose_stage_latency_index_size_and_jobs(service, clips, api):
    with service() as client:
        api.ingest(client, [clips[0]["path"]])
        client.post("/search", json={"query": "red square"})
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
        for stage in ("encode", "faiss", "tokens", "rerank", "total"):
            assert re.search(rf'tvs_search_stage_seconds_count{{stage="{stage}"}} [1-9]', text), stage
        assert "tvs_index_size 1.0" in text
        device = client.get("/health").json()["index"]["device"]
        assert f'tvs_index_info{{device="{device}",factory="Flat"}} 1.0' in text
        assert 'tvs_jobs{state="ready"} 1.0' in text and 'tvs_jobs{state="failed"} 0.0' in text
        assert 'tvs_http_request_duration_seconds_count{method="POST",route="/search",status="200"}' in text
        assert 'route="/jobs/{job_id}"' in text  # labelled by template, not by id


def test_write_endpoints_need_the_api_key(service, clips, api):
    with service(api_key=KEY) as client:
        assert client.get("/health").json()["auth_required"] is True
        r = api.upload(client, clips[0]["path"])
        assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
        assert api.upload(client, clips[0]["path"], **{"X-API-Key": "wrong"}).status_code == 401
        assert client.post("/videos", json={"path": "/x"}).status_code == 401
        ok = api.upload(client, clips[0]["path"], **{"X-API-Key": KEY})
        assert ok.status_code == 202
        video_id = ok.json()["video_id"]
        assert client.delete(f"/videos/{video_id}").status_code == 401
        assert (
            client.delete(f"/videos/{video_id}", headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        # Reads need it too (private by default; tests/app/test_access.py has every route).
        assert client.get("/videos").status_code == 401
        assert client.post("/search", json={"query": "dog"}).status_code == 401
        assert client.get(f"/jobs/{ok.json()['job_id']}", headers={"X-API-Key": KEY}).status_code == 200
        assert (
            client.delete(f"/videos/{video_id}", headers={"Authorization": f"Bearer {KEY}"}).status_code
            == 200
        )


def test_production_refuses_to_start_without_a_strong_key(tmp_path: Path):
    with pytest.raises(ValidationError, match="TVS_API_KEY"):
        Settings(env="production", data_dir=tmp_path)
    with pytest.raises(ValidationError, match="16 characters"):
        Settings(env="production", api_key="short", data_dir=tmp_path)
    with pytest.raises(ValidationError, match="CORS"):
        Settings(env="production", api_key=KEY, cors_origins="*")
    assert Settings(env="production", api_key=KEY).api_key is not None


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("TVS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TVS_ALLOWED_ROOTS", f"{tmp_path}/a, {tmp_path}/b")
    monkeypatch.setenv("TVS_CORS_ORIGINS", '["https://x.example"]')
    monkeypatch.setenv("TVS_BATCH_MAX_SIZE", "16")
    monkeypatch.setenv("TVS_WORKER", "false")
    monkeypatch.setenv("TVS_API_KEY", "  ")
    monkeypatch.setenv("TVS_INDEX_DEVICE", "CUDA:1")
    monkeypatch.setenv("TVS_INDEX_NPROBE", "8")
    monkeypatch.setenv("TVS_INDEX_EF_SEARCH", "32")
    monkeypatch.setenv("TVS_INDEX_RERANK", "0")
    s = Settings()
    assert s.data_dir == tmp_path and s.batch_max_size == 16 and s.worker is False and s.api_key is None
    assert (s.index_device, s.index_nprobe, s.index_ef_search, s.index_rerank) == ("cuda:1", 8, 32, 0)
    assert s.allowed_roots == [tmp_path / "a", tmp_path / "b"]
    assert s.cors_origins == ["https://x.example"]
    for name, bad, message in [
        ("TVS_INDEX_DEVICE", "gpu", "not one of auto, cpu, cuda, cuda:N"),
        ("TVS_INDEX_NPROBE", "0", "greater than or equal to 1"),
        ("TVS_INDEX_RERANK", "-1", "greater than or equal to 0"),
    ]:
        with monkeypatch.context() as m:
            m.setenv(name, bad)
            with pytest.raises(ValidationError, match=message):
                Settings()
    monkeypatch.setenv("TVS_ENV", "production")
    with pytest.raises(ValidationError):
        Settings()


def test_cors_is_off_by_default_and_on_when_configured(service):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with service() as client:
        r = client.get("/health", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in r.headers
        assert client.options("/search", headers=preflight).status_code == 405
    with service(cors_origins=["https://app.example"]) as client:
        r = client.get("/health", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert client.options("/search", headers=preflight).status_code == 200
        other = client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_demo_page_is_served_with_a_strict_policy_and_no_inline_script():
    client = TestClient(create_app(Settings(model="tiny")))  # static files need no lifespan
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    html = page.text
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts and all('src="/static/' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handlers break under the CSP"
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "no CDN: the page must work offline"
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        r = client.get(asset)
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "content-security-policy" in r.headers
    assert "content-security-policy" not in client.get("/openapi.json").headers


def test_start_up_creates_the_schema_of_an_empty_database(tmp_path: Path):
    settings = Settings(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'empty.db'}", model="tiny"
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").json()["ready"] is True
        assert client.post("/search", json={"query": "dog"}).json()["results"] == []


@pytest.mark.postgres
def test_start_up_upgrades_an_older_postgres_schema_only_with_auto_migrate(
    tmp_path: Path, postgres_available: None, newer_release: tuple[str, str]
):
    old, new = newer_release
    url = create_postgres_database()
    try:
        upgrade_database(url, old)  # this release's head: older than the newer release's
        settings = Settings(data_dir=tmp_path / "data", database_url=url, model="tiny")
        with pytest.raises(DatabaseNotMigratedError, match="indexer migrate.*TVS_AUTO_MIGRATE=true"):
            with TestClient(create_app(settings)):
                pass
        with TestClient(create_app(settings.model_copy(update={"auto_migrate": True}))) as client:
            assert client.get("/health").json()["ready"] is True
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                revision = connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one()
        finally:
            engine.dispose()
        assert revision == new
    finally:
        drop_postgres_database(url)


def test_auto_migrate_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    assert Settings().auto_migrate is False
    monkeypatch.setenv("TVS_AUTO_MIGRATE", "true")
    assert Settings().auto_migrate is True


def test_openapi_documents_every_endpoint():
    schema = TestClient(create_app(Settings(model="tiny"))).get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths) >= {
        "/search",
        "/videos",
        "/videos/{video_id}",
        "/videos/{video_id}/media",
        "/segments/{segment_id}/thumbnail",
        "/jobs/{job_id}",
        "/health",
        "/metrics",
    }
    body = paths["/videos"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}


NO_FAISS_GPU = pytest.mark.skipif(hasattr(faiss, "StandardGpuResources"), reason="faiss has GPU support here")


@NO_FAISS_GPU
@pytest.mark.parametrize(
    ("device", "reason"),
    [("cpu", "the index device is set to cpu"), ("auto", "index device auto: faiss has no GPU support")],
)
def test_the_index_runs_on_the_cpu_and_says_why(
    service, device: str, reason: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setenv("TVS_INDEX_DEVICE", device)  # through the environment, as a deployment sets it
    with caplog.at_level(logging.INFO, logger="indexer.live_index"):
        with service(**Settings().model_dump(include={"index_device"})) as client:
            index = client.get("/health").json()["index"]
            assert index["device"] == "cpu" and reason in index["device_reason"]
            assert 'tvs_index_info{device="cpu",factory="Flat"} 1.0' in client.get("/metrics").text
    lines = [r.getMessage() for r in caplog.records if "FAISS index is on the CPU" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0]


@NO_FAISS_GPU
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_gpu_index_device_without_faiss_gpu_support_stops_the_start_up(service, device: str):
    with pytest.raises(IndexDeviceError, match=rf"index device '{device}' cannot be used: faiss has no GPU"):
        with service(index_device=device):
            pass


def test_index_knobs_reach_the_index_and_health(service, clips, api):
    with service(index_factory="HNSW16", index_ef_search=24, index_rerank=3) as client:
        index = client.get("/health").json()["index"]
        assert (index["type"], index["nprobe"], index["ef_search"], index["rerank"]) == (
            "HNSW16",
            None,
            24,
            3,
        )
        api.ingest(client, [clips[0]["path"], clips[1]["path"]])
        r = api.search(client, "red square", limit=5)
        assert r.status_code == 200 and len(r.json()["results"]) == 2
    with service(index_factory="HNSW16") as client:  # unset knobs: the ones saved with the snapshot
        index = client.get("/health").json()["index"]
        assert (index["ef_search"], index["rerank"], index["size"]) == (24, 3, 2)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"index_nprobe": 4}, "nprobe=4 needs an IVF factory"),
        ({"index_factory": "HNSW16", "index_nprobe": 4}, "nprobe=4 needs an IVF factory"),
        ({"index_factory": "IVF4,Flat", "index_ef_search": 8}, "ef_search=8 needs an HNSW factory"),
    ],
)
def test_an_index_knob_for_another_index_type_stops_the_start_up(service, settings, message):
    with pytest.raises(IndexConfigError, match=message):
        with service(**settings):
            pass
