"""Alembic migrations: up, down and up again, no drift from the models, and the schema check."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import main as alembic_main
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from indexer.catalog import Base
from indexer.db import (
    DatabaseNotMigratedError,
    check_schema_current,
    downgrade_database,
    make_engine,
    upgrade_database,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLES = {"videos", "segments", "jobs", "changes", "models", "id_allocator", "feed_horizons"}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    upgrade_database(db_url)
    assert TABLES <= _tables(db_url)
    downgrade_database(db_url, "base")
    assert _tables(db_url) & TABLES == set()
    upgrade_database(db_url)
    assert TABLES <= _tables(db_url)


def test_feed_horizons_revision_downgrades_to_the_initial_schema(db_url: str) -> None:
    upgrade_database(db_url)
    downgrade_database(db_url, "0001")
    assert _tables(db_url) & TABLES == TABLES - {"feed_horizons"}
    upgrade_database(db_url)
    assert TABLES <= _tables(db_url)
    assert _diff(db_url) == []


def test_migrated_schema_matches_models(db_url: str) -> None:
    upgrade_database(db_url)
    assert _diff(db_url) == []
    # The comparison does look at indexes: removing one is reported.
    engine = make_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_segments_model_id"))
    engine.dispose()
    assert [d[0] for d in _diff(db_url)] == ["add_index"]


def test_schema_check_follows_the_revision(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with pytest.raises(DatabaseNotMigratedError, match="indexer migrate"):
            check_schema_current(engine)
        upgrade_database(db_url)
        check_schema_current(engine)
        downgrade_database(db_url, "base")
        with pytest.raises(DatabaseNotMigratedError, match="indexer migrate"):
            check_schema_current(engine)
    finally:
        engine.dispose()


def test_schema_check_names_a_newer_release(db_url: str) -> None:
    upgrade_database(db_url)
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = 'ffff_from_the_future'"))
        with pytest.raises(DatabaseNotMigratedError, match="newer release"):
            check_schema_current(engine)
    finally:
        engine.dispose()


def test_upgrade_works_from_any_directory_and_ignores_the_env_url(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("TVS_DATABASE_URL", f"sqlite:///{tmp_path / 'other.db'}")
    upgrade_database(sqlite_url)
    assert TABLES <= _tables(sqlite_url)
    assert not (tmp_path / "other.db").exists()


@pytest.fixture
def keep_root_logging() -> Iterator[None]:
    # alembic.ini configures logging; leave the rest of the test session's logging as it was.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_alembic_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep_root_logging: None
) -> None:
    monkeypatch.chdir(tmp_path)
    ini = str(REPO_ROOT / "alembic.ini")
    by_x_arg = f"sqlite:///{tmp_path / 'x.db'}"
    alembic_main(argv=["-c", ini, "-x", f"url={by_x_arg}", "upgrade", "head"])
    assert TABLES <= _tables(by_x_arg)

    by_env = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("TVS_DATABASE_URL", by_env)
    alembic_main(argv=["-c", ini, "upgrade", "head"])
    assert TABLES <= _tables(by_env)

    monkeypatch.delenv("TVS_DATABASE_URL")
    monkeypatch.setenv("TVS_DATA_DIR", str(tmp_path / "data"))
    alembic_main(argv=["-c", ini, "upgrade", "head"])
    assert TABLES <= _tables(f"sqlite:///{tmp_path / 'data' / 'catalog.db'}")
