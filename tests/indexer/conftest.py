"""Database fixtures: SQLite and PostgreSQL catalogs per test, empty or migrated to head and emptied."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres_admin import BACKENDS, create_postgres_database, drop_postgres_database
from sqlalchemy import Engine, create_engine, pool, text
from sqlalchemy.orm import Session, sessionmaker

from indexer.catalog import Base
from indexer.db import make_engine, make_session_factory, upgrade_database


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
