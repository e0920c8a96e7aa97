"""GET /jobs (state filter, cursor pages), POST /jobs/{id}/retry and DELETE /jobs/{id}, and their refusals."""

from __future__ import annotations

import pytest


@pytest.fixture
def queued(service, clips, api):
    """A service without a worker, so that jobs stay queued: three uploads."""
    with service(worker=False) as client:
        bodies = [api.upload(client, clip["path"]).json() for clip in clips[:3]]
        yield client, bodies


def test_list_newest_first_in_cursor_pages_and_by_state(queued):
    client, bodies = queued
    ids = [b["job_id"] for b in bodies]
    first = client.get("/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["count"] == 3
    assert first["data"][0]["title"] and first["data"][0]["state"] == "queued"
    rest = client.get("/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["next_cursor"] is None
    client.delete(f"/jobs/{ids[1]}")
    cancelled = client.get("/jobs", params={"state": "cancelled"}).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[1]] and cancelled["count"] == 1
    assert client.get("/jobs", params={"state": "queued"}).json()["count"] == 2


def test_cancel_a_queued_job_then_retry_it(queued):
    client, bodies = queued
    job_id, video_id = bodies[0]["job_id"], bodies[0]["video_id"]
    r = client.delete(f"/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled" and r.json()["finished_at"], r.text
    video = client.get(f"/videos/{video_id}").json()
    assert video["status"] == "failed" and "cancelled" in video["error"]
    assert client.delete(f"/jobs/{job_id}").status_code == 409
    r = client.post(f"/jobs/{job_id}/retry")
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["attempts"], r.json()["error"]) == ("queued", 0, None)
    assert client.get(f"/videos/{video_id}").json()["status"] == "pending"
    r = client.post(f"/jobs/{job_id}/retry")
    assert r.status_code == 409 and "queued" in r.json()["detail"]


def test_a_job_of_a_deleted_video_is_not_retried(queued):
    client, bodies = queued
    job_id, video_id = bodies[2]["job_id"], bodies[2]["video_id"]
    assert client.delete(f"/videos/{video_id}").status_code == 200
    assert client.get(f"/jobs/{job_id}").json()["state"] == "failed"
    r = client.post(f"/jobs/{job_id}/retry")
    assert r.status_code == 409 and "deleted" in r.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path", "params", "status"),
    [
        ("GET", "/jobs/999999", None, 404),
        ("POST", "/jobs/999999/retry", None, 404),
        ("DELETE", "/jobs/999999", None, 404),
        ("GET", "/jobs/0", None, 422),
        ("DELETE", "/jobs/-1", None, 422),
        ("GET", "/jobs", {"state": "exploded"}, 422),
        ("GET", "/jobs", {"limit": 0}, 422),
        ("GET", "/jobs", {"limit": 101}, 422),
        ("GET", "/jobs", {"cursor": "x"}, 422),
        ("GET", "/jobs", {"cursor": 2**64}, 422),
    ],
)
def test_hostile_requests_get_4xx(queued, method, path, params, status):
    client, _ = queued
    r = client.request(method, path, params=params)
    assert r.status_code == status, r.text
    assert r.json()["detail"]


def test_cancel_and_retry_need_the_api_key(service, clips, api):
    with service(worker=False, api_key="k" * 20) as client:
        job_id = api.upload(client, clips[0]["path"], **{"X-API-Key": "k" * 20}).json()["job_id"]
        assert client.delete(f"/jobs/{job_id}").status_code == 401
        assert client.post(f"/jobs/{job_id}/retry").status_code == 401
        assert client.get("/jobs").status_code == 401  # jobs are private once a key is configured
        assert client.get("/jobs", headers={"X-API-Key": "k" * 20}).status_code == 200
