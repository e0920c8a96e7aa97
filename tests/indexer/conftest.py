"""Database fixtures: SQLite and PostgreSQL catalogs per test, empty or migrated to head and emptied."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, pool, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from indexer.catalog import Base
from indexer.db import make_engine, make_session_factory, upgrade_database

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def postgres_admin_url() -> str:
    return os.environ.get("TVS_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def _admin_engine() -> Engine:
    # CREATE/DROP DATABASE cannot run inside a transaction.
    return create_engine(
        postgres_admin_url(),
        isolation_level="AUTOCOMMIT",
        poolclass=pool.NullPool,
        connect_args={"connect_timeout": 3},
    )


def create_postgres_database() -> str:
    """Create a uniquely named database (so parallel runs never collide) and return its URL."""
    name = f"tvs_test_{uuid.uuid4().hex[:16]}"
    engine = _admin_engine()
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
    finally:
        engine.dispose()
    return make_url(postgres_admin_url()).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    name = make_url(url).database
    engine = _admin_engine()
    try:
        with engine.connect() as connection:
            # FORCE ends connections a failed test may have leaked.
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def postgres_available() -> None:
    """Skip (with the reason) when the test PostgreSQL server cannot be reached."""
    engine = _admin_engine()
    try:
        with engine.connect():
            pass
    except Exception as e:  # any driver or network failure means "not available here"
        reason = str(getattr(e, "orig", e)).splitlines()[0]
        pytest.skip(f"PostgreSQL unreachable at TVS_TEST_POSTGRES_URL ({postgres_admin_url()}): {reason}")
    finally:
        engine.dispose()


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
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Migrate once, copy the file per test: much cheaper than running Alembic for every test.
    path = tmp_path_factory.mktemp("sqlite_template") / "catalog.db"
    upgrade_database(f"sqlite:///{path}")
    return path


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
def migrated_sqlite_url(tmp_path: Path, _sqlite_template: Path) -> str:
    path = tmp_path / "catalog.db"
    shutil.copyfile(_sqlite_template, path)
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
