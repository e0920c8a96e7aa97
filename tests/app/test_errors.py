"""Error bodies carry a stable `code` (the table in docs/errors.md), and OpenAPI operation ids are readable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.deps import get_settings
from app.errors import ERROR_CODES
from app.main import create_app
from app.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
KEY = "k" * 24


def test_the_documented_table_is_the_code_table() -> None:
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d+) \| (.+?) \|$", DOC.read_text(), re.M)
    expected = [(code, str(status), when) for code, (status, when) in ERROR_CODES.items()]
    table = "\n".join(f"| `{c}` | {s} | {w} |" for c, s, w in expected)
    assert rows == expected, f"docs/errors.md is out of date; its table should be:\n{table}"


def test_the_operation_ids_are_unique_and_readable() -> None:
    schema = TestClient(create_app(Settings(model="tiny"))).get("/openapi.json").json()
    ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)), ids
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", i) for i in ids), ids
    assert {"search", "list_videos", "get_video", "add_video", "get_job", "get_health"} <= set(ids)
    problem = schema["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"detail", "code"}


def test_a_service_that_is_still_starting_answers_503_with_its_code() -> None:
    client = TestClient(create_app(Settings(model="tiny")))  # no `with`: the lifespan never runs
    r = client.get("/videos")
    assert r.status_code == 503 and r.json()["code"] == "service_starting", r.text
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_every_error_of_a_running_service_has_its_code(service, clips, api) -> None:
    with service(api_key=KEY, max_upload_bytes=1000) as client:
        read = {"X-API-Key": KEY}  # reads need the key too, once one is configured
        cases = [
            (client.get("/videos/9999", headers=read), 404, "video_not_found"),
            (client.get("/jobs/9999", headers=read), 404, "job_not_found"),
            (client.get("/videos/9999/media", headers=read), 404, "media_not_found"),
            (client.get("/segments/9999/thumbnail", headers=read), 404, "thumbnail_not_found"),
            (client.get("/no/such/route"), 404, "not_found"),
            (client.put("/search", headers=read), 405, "method_not_allowed"),
            (client.post("/search", json={"query": ""}, headers=read), 422, "validation_error"),
            (client.get("/videos/0", headers=read), 422, "validation_error"),
            (client.get("/videos/9999"), 401, "api_key_missing"),
            (api.upload(client, clips[0]["path"]), 401, "api_key_missing"),
            (api.upload(client, clips[0]["path"], **{"X-API-Key": "wrong"}), 401, "api_key_invalid"),
            (api.upload(client, clips[0]["path"], **{"X-API-Key": KEY}), 413, "upload_too_large"),
            (client.post("/search", content=b"x" * (2 << 20), headers=read), 413, "body_too_large"),
            (
                client.post(
                    "/videos", content=b"x", headers={"X-API-Key": KEY, "content-type": "text/plain"}
                ),
                415,
                "unsupported_media_type",
            ),
        ]
        for r, status, code in cases:
            assert (r.status_code, r.json().get("code")) == (status, code), r.text
            assert ERROR_CODES[code][0] == status
            assert isinstance(r.json()["detail"], list if code == "validation_error" else str)
        assert "query" in client.post("/search", json={"query": ""}, headers=read).json()["message"]


def test_an_unexpected_exception_is_a_json_500_with_the_request_id(
    tmp_path: Path, launch, new_database, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> Settings:
        raise RuntimeError("boom")

    with launch(tmp_path / "data", new_database("sqlite"), {get_settings: broken}) as client:
        r = client.get("/health", headers={"X-Request-ID": "req-500"})
    assert r.status_code == 500 and r.json()["code"] == "internal_error", r.text
    assert r.headers["x-request-id"] == "req-500" and "req-500" in r.json()["detail"]
    failed = [rec for rec in caplog.records if rec.name == "app.request_log" and rec.exc_info]
    assert failed and "boom" in str(failed[0].exc_info[1])
