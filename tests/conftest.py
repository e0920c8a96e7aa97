"""Fixtures every test folder shares: is PostgreSQL there, and a migrated SQLite catalog to copy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres_admin import admin_engine, postgres_admin_url

from indexer.db import upgrade_database


@pytest.fixture(scope="session")
def postgres_available() -> Iterator[None]:
    """Skip (with the reason) when the test PostgreSQL server cannot be reached."""
    engine = admin_engine()
    try:
        with engine.connect():
            pass
    except Exception as e:  # any driver or network failure means "not available here"
        reason = str(getattr(e, "orig", e)).splitlines()[0]
        pytest.skip(f"PostgreSQL unreachable at TVS_TEST_POSTGRES_URL ({postgres_admin_url()}): {reason}")
    finally:
        engine.dispose()
    yield


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Migrate once, copy the file per test: much cheaper than running Alembic for every test.
    path = tmp_path_factory.mktemp("sqlite_template") / "catalog.db"
    upgrade_database(f"sqlite:///{path}")
    return path
