"""The service on Milvus when Milvus goes away: search answers 503, ingest jobs wait, everything resumes."""

from __future__ import annotations

import time
from contextlib import ExitStack

import pytest
from helpers.milvus import lite_server
from helpers.ports import free_port


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_milvus_outage_gives_503_and_jobs_wait_for_it(tmp_path, db_url, launch, clips, api):
    pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (pip install -e '.[milvus]')")
    port, folder = free_port(), tmp_path / "milvus"
    folder.mkdir()
    settings = dict(vector_backend="milvus", milvus_uri=f"http://127.0.0.1:{port}", milvus_timeout_s=2.0)
    with ExitStack() as outer:
        milvus = ExitStack()
        outer.callback(milvus.close)
        milvus.enter_context(lite_server(folder, port))
        client = outer.enter_context(launch(tmp_path / "data", db_url, **settings))
        first = api.ingest(client, [clips[0]["path"]])[0]

        milvus.close()  # Milvus goes down; the service keeps running
        r = api.search(client)
        assert r.status_code == 503, r.text
        assert "vector database cannot be reached" in r.json()["detail"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "vector database unreachable"
        assert client.get("/metrics").status_code == 200
        upload = api.upload(client, clips[1]["path"])
        assert upload.status_code == 202, upload.text
        job_id, second = upload.json()["job_id"], upload.json()["video_id"]
        # The job is tried every few seconds while Milvus is down, and no try counts against max_attempts.
        deadline, job = time.monotonic() + 20, {}
        while time.monotonic() < deadline:
            job = client.get(f"/jobs/{job_id}").json()
            if job["state"] == "queued" and job["error"]:
                break
            time.sleep(0.2)
        assert job["state"] == "queued" and "Milvus" in job["error"], job
        assert job["attempts"] == 0, job
        time.sleep(6)  # more tries
        job = client.get(f"/jobs/{job_id}").json()
        assert job["state"] != "failed" and job["attempts"] <= 1, job
        assert client.get(f"/videos/{second}").json()["status"] != "failed"

        milvus.enter_context(lite_server(folder, port))  # back, on the same data
        assert api.wait_job(client, job_id)["state"] == "ready"
        api.wait_searchable(client, {first, second})


def test_a_bad_milvus_index_setting_is_refused_with_the_expected_form(tmp_path):
    from pydantic import ValidationError

    from app.settings import Settings

    with pytest.raises(ValidationError, match=r"TVS_MILVUS_INDEX='ivf flat': expected an index type"):
        Settings(data_dir=tmp_path, milvus_index="ivf flat")
    config = Settings(data_dir=tmp_path, vector_backend="milvus", milvus_index="IVF_FLAT:nlist=64,nprobe=8")
    milvus = config.milvus_config()
    assert (milvus.uri, milvus.index_type) == (str(tmp_path / "milvus.db"), "IVF_FLAT")
    assert (milvus.index_params, milvus.search_params) == ({"nlist": 64}, {"nprobe": 8})
