"""Throwaway PostgreSQL databases for tests: created with unique names, dropped with FORCE."""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import Engine, create_engine, pool
from sqlalchemy.engine import make_url

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def postgres_admin_url() -> str:
    return os.environ.get("TVS_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def admin_engine() -> Engine:
    # CREATE/DROP DATABASE cannot run inside a transaction.
    return create_engine(
        postgres_admin_url(),
        isolation_level="AUTOCOMMIT",
        poolclass=pool.NullPool,
        connect_args={"connect_timeout": 3},
    )


def create_postgres_database(template: str | None = None, prefix: str = "tvs_test") -> str:
    """Create a uniquely named database (so parallel runs never collide), optionally copied from
    `template`, and return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    engine = admin_engine()
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(
                f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else "")
            )
    finally:
        engine.dispose()
    return make_url(postgres_admin_url()).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    engine = admin_engine()
    try:
        with engine.connect() as connection:
            # FORCE ends connections a failed test may have leaked.
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {make_url(url).database} WITH (FORCE)")
    finally:
        engine.dispose()
