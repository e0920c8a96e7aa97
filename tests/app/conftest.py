"""Service fixtures: migrated SQLite/PostgreSQL catalogs, generated clips, and running apps with the tiny model."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers.postgres import BACKENDS, create_postgres_database, drop_postgres_database
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import make_url

from app.main import create_app
from app.settings import Settings
from indexer.db import upgrade_database

JOB_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def postgres_template(postgres_available: None) -> Iterator[str]:
    url = create_postgres_database(prefix="tvs_app_test")
    try:
        upgrade_database(url)
        yield str(make_url(url).database)
    finally:
        drop_postgres_database(url)


@pytest.fixture(scope="session")
def new_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], str]]:
    """`new_database("sqlite" | "postgres")` -> the URL of a fresh migrated catalog, dropped at the end."""
    made: list[str] = []

    def make(backend: str) -> str:
        if backend == "sqlite":
            template = request.getfixturevalue("sqlite_template")
            path = tmp_path_factory.mktemp("db") / "catalog.db"
            shutil.copyfile(template, path)
            return f"sqlite:///{path}"
        url = create_postgres_database(
            template=request.getfixturevalue("postgres_template"), prefix="tvs_app_test"
        )
        made.append(url)
        return url

    yield make
    for url in made:
        drop_postgres_database(url)


@pytest.fixture(scope="session")
def reusable_postgres(postgres_template: str) -> Iterator[str]:
    """One PostgreSQL catalog for all function-scoped tests, emptied before each (dropping is slow)."""
    url = create_postgres_database(template=postgres_template, prefix="tvs_app_test")
    yield url
    drop_postgres_database(url)


def _empty_postgres(url: str) -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.begin() as connection:
            tables = connection.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
            ).scalars()
            connection.exec_driver_sql(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    finally:
        engine.dispose()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, new_database: Callable[[str], str]) -> str:
    """A migrated, empty catalog on each backend."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("reusable_postgres")
        _empty_postgres(url)
        return url
    return new_database("sqlite")


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Two generated families (12 small clips): manifest lines with an absolute `path`."""
    from synth.generator import generate_library

    out = tmp_path_factory.mktemp("clips")
    summary = generate_library(out, families=2, seed=11, holdout=0.5, size=64, workers=1)
    lines = [json.loads(line) for line in summary.manifest.read_text().splitlines()]
    return [{**line, "path": out / line["video"]} for line in lines]


@pytest.fixture(scope="session")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from synth.media import write_hostile_files

    return write_hostile_files(tmp_path_factory.mktemp("hostile"))


def make_settings(data_dir: Path, db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        data_dir=data_dir,
        database_url=db_url,
        model="tiny",
        batch_max_wait_ms=2.0,
        follow_interval_s=0.1,
    )
    values.update(overrides)
    return Settings(**values)


@contextmanager
def running(
    settings: Settings, overrides: dict[Callable[..., Any], Callable[..., Any]] | None = None
) -> Iterator[TestClient]:
    app = create_app(settings)
    app.dependency_overrides.update(overrides or {})
    with TestClient(app) as client:
        yield client


@contextmanager
def serving(
    settings: Settings, overrides: dict[Callable[..., Any], Callable[..., Any]] | None = None
) -> Iterator[str]:
    """The app under a real uvicorn server in a thread (for HTTP clients and browsers); yields its base URL."""
    import uvicorn

    app = create_app(settings)
    app.dependency_overrides.update(overrides or {})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start (see the log above)")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture(scope="session")
def serve() -> Callable[..., Any]:
    """`with serve(data_dir, db_url, dependency_overrides=None, **settings) as base_url:`."""

    def start(data_dir: Path, db_url: str, dependency_overrides: Any = None, **overrides: Any) -> Any:
        return serving(make_settings(data_dir, db_url, **overrides), dependency_overrides)

    return start


@pytest.fixture(scope="session")
def launch() -> Callable[..., Any]:
    """`with launch(data_dir, db_url, dependency_overrides=None, **settings) as client:` for any scope."""

    def start(data_dir: Path, db_url: str, dependency_overrides: Any = None, **overrides: Any) -> Any:
        return running(make_settings(data_dir, db_url, **overrides), dependency_overrides)

    return start


@pytest.fixture
def vector_backend(request: pytest.FixtureRequest) -> str:
    """faiss unless a test parametrizes it (`@pytest.mark.parametrize("vector_backend", [...], indirect=True)`)."""
    return str(getattr(request, "param", "faiss"))


def backend_settings(request: pytest.FixtureRequest, backend: str) -> dict[str, Any]:
    """The settings that put a service on `backend`: Milvus is the session's shared server (own prefix)."""
    if backend == "faiss":
        return {}
    import uuid

    uri = request.getfixturevalue("milvus_uri")
    return {"vector_backend": "milvus", "milvus_uri": uri, "milvus_prefix": f"t_{uuid.uuid4().hex[:12]}"}


@pytest.fixture
def service(
    request: pytest.FixtureRequest, tmp_path: Path, db_url: str, vector_backend: str
) -> Callable[..., Any]:
    """`with service(**settings) as client:` a running app on a fresh data dir and catalog."""
    backend = backend_settings(request, vector_backend)

    def start(**overrides: Any) -> Any:
        deps = overrides.pop("dependency_overrides", None)
        return running(make_settings(tmp_path / "data", db_url, **{**backend, **overrides}), deps)

    return start


@pytest.fixture(scope="session")
def settings_for_backend() -> Callable[[pytest.FixtureRequest, str], dict[str, Any]]:
    """`settings_for_backend(request, "faiss" | "milvus")` -> the service settings for that vector backend."""
    return backend_settings


class Api:
    """HTTP helpers the tests share (a fixture, since tests do not import conftest)."""

    @staticmethod
    def upload(client: TestClient, path: Path, title: str | None = None, **headers: str) -> Any:
        with open(path, "rb") as f:
            data = {"title": title} if title else {}
            return client.post(
                "/videos", files={"file": (path.name, f, "video/mp4")}, data=data, headers=headers
            )

    @staticmethod
    def wait_job(client: TestClient, job_id: int, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = client.get(f"/jobs/{job_id}").json()
            if job["state"] in ("ready", "failed", "cancelled"):
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not finish within {timeout} s: {job}")

    @staticmethod
    def wait_job_until(
        client: TestClient,
        job_id: int,
        done: Callable[[dict[str, Any]], bool],
        timeout: float = JOB_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Poll GET /jobs/{id} until done(job) holds."""
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = client.get(f"/jobs/{job_id}").json()
            if done(job):
                return job
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} never reached the expected state within {timeout} s: {job}")

    @staticmethod
    def search(client: TestClient, query: str = "anything", **body: Any) -> Any:
        return client.post("/search", json={"query": query, **body})

    def wait_searchable(self, client: TestClient, video_ids: set[int], timeout: float = 5.0) -> None:
        """Until every video has a segment in this process's index (the change feed applied it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.search(client, limit=100, rerank=False).json()
            if video_ids <= {r["video_id"] for r in body["results"]}:
                return
            time.sleep(0.05)
        raise AssertionError(f"videos {video_ids} not searchable within {timeout} s")

    def ingest(self, client: TestClient, paths: list[Path], titles: list[str] | None = None) -> list[int]:
        """Upload files, wait for their jobs and for the index; the new video ids in order."""
        ids, job_ids = [], []
        for n, path in enumerate(paths):
            r = self.upload(client, path, titles[n] if titles else None)
            assert r.status_code == 202, r.text
            ids.append(r.json()["video_id"])
            job_ids.append(r.json()["job_id"])
        for job_id in job_ids:
            job = self.wait_job(client, job_id)
            assert job["state"] == "ready", job
        self.wait_searchable(client, set(ids))
        return ids


@pytest.fixture(scope="session")
def api() -> Api:
    return Api()
