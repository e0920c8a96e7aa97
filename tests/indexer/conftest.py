"""Database fixtures: SQLite and PostgreSQL catalogs per test, empty or migrated to head and emptied; a
synthetic library of 5000 segments for index tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers.postgres import BACKENDS, create_postgres_database, drop_postgres_database
from sqlalchemy import Engine, create_engine, pool, text
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog
from indexer.catalog import Base
from indexer.db import make_engine, make_session_factory, session_scope, upgrade_database
from indexer.paths import DataDir
from indexer.token_store import TokenStore


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'catalog.db'}"


@pytest.fixture
def postgres_url(postgres_available: None) -> Iterator[str]:
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest) -> str:
    """An empty database on each backend."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture(scope="session")
def _postgres_shared(postgres_available: None) -> Iterator[str]:
    # One migrated database per test session, emptied before each test: creating a database per
    # test costs about half a second, a TRUNCATE a few milliseconds.
    url = create_postgres_database()
    try:
        upgrade_database(url)
        yield url
    finally:
        drop_postgres_database(url)


def reset_postgres_database(url: str) -> None:
    """Empty every catalog table and restart the id sequences, as if freshly migrated."""
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.begin() as connection:
            # Connections an earlier test leaked (open transactions) would block the TRUNCATE.
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


@pytest.fixture
def migrated_sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    path = tmp_path / "catalog.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def migrated_postgres_url(_postgres_shared: str) -> str:
    """The session's migrated PostgreSQL database, emptied for this test."""
    reset_postgres_database(_postgres_shared)
    return _postgres_shared


@pytest.fixture(params=BACKENDS)
def migrated_db_url(request: pytest.FixtureRequest) -> str:
    """A database at the newest migration on each backend."""
    return request.getfixturevalue(f"migrated_{request.param}_url")


@pytest.fixture
def db_engine(migrated_db_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(db_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(db_engine)


SYNTHETIC_MODEL = "synthetic-32"


def clustered_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors in 40 overlapping clusters: near neighbours an IVF with few probes misses."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim))
    x = centres[rng.integers(0, 40, n)] + 0.9 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def synthetic_library(migrated_sqlite_url: str, tmp_path: Path) -> Iterator[tuple[Path, str, np.ndarray]]:
    """(data dir, catalog URL, CLS vectors [5000, 32]): one ready video of 5000 segments of the active model
    SYNTHETIC_MODEL (dim 32, T=1), written straight to the catalog and the token store, no model run.
    Segment ids are 1..5000 in the order of the vectors."""
    n, dim = 5000, 32
    vecs = clustered_vectors(n, dim, seed=0)
    data = DataDir(tmp_path / "data").ensure()
    engine = make_engine(migrated_sqlite_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        catalog.ensure_model(session, SYNTHETIC_MODEL, "synthetic", dim, 1)
        catalog.activate_model(session, SYNTHETIC_MODEL)
        video_id = catalog.create_video(session, sha256="a" * 64, source="test")[0].id
    with session_scope(factory) as session:
        ids = catalog.allocate_segment_ids(session, n)
    assert ids == list(range(1, n + 1))
    store = TokenStore(data.tokens_dir(SYNTHETIC_MODEL), 1, dim)
    store.put_many(ids, vecs[:, None, :], vecs)
    store.flush()
    store.close()
    rows = [catalog.NewSegment(i, o, float(o), float(o + 1)) for o, i in enumerate(ids)]
    with session_scope(factory) as session:
        catalog.add_segments(session, video_id, SYNTHETIC_MODEL, rows)
        catalog.set_video_status(session, video_id, "ready")
    engine.dispose()
    yield data.root, migrated_sqlite_url, vecs
