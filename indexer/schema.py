"""The catalog schema at start-up: created on an empty database, upgraded under a lock when it is older."""

from __future__ import annotations

import fcntl
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Engine, inspect, text

from indexer.db import DatabaseNotMigratedError, is_postgres, schema_revisions, upgrade_database

logger = logging.getLogger(__name__)

AUTO_MIGRATE_ENV = "TVS_AUTO_MIGRATE"
# Any constant works as long as every process uses the same one: "tvs_migr" in ASCII.
PG_MIGRATION_LOCK_KEY = 0x7476_735F_6D69_6772


@dataclass(frozen=True)
class SchemaState:
    current: frozenset[str]  # the database's Alembic revisions (empty: none recorded)
    expected: frozenset[str]  # the code's heads
    known: frozenset[str]  # every revision this code has
    has_tables: bool  # any table besides alembic_version

    @property
    def is_current(self) -> bool:
        return self.current == self.expected


def schema_state(engine: Engine) -> SchemaState:
    current, expected, known = schema_revisions(engine)
    tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
    return SchemaState(frozenset(current), frozenset(expected), frozenset(known), bool(tables))


def ensure_schema(engine: Engine, *, auto_migrate: bool = False) -> None:
    """Bring the catalog to the code's schema, or raise DatabaseNotMigratedError saying what to do.

    An empty database (no tables) gets the schema. An older schema is upgraded on SQLite after a backup
    copy of the catalog file, and on PostgreSQL only with `auto_migrate` (TVS_AUTO_MIGRATE=true): there
    the upgrade is usually a release step run once, by `indexer migrate`. Processes starting together
    take turns (a lock file beside a SQLite catalog, an advisory lock on PostgreSQL); each one checks the
    schema again once it holds the lock, so only the first migrates.
    """
    if schema_state(engine).is_current:
        return
    with migration_lock(engine):
        # Judged only under the lock: a SQLite catalog being created by another process has tables but no
        # revision yet (SQLite's DDL is not transactional), and a schema may have become current meanwhile.
        state = schema_state(engine)
        if state.is_current:
            return
        _refuse_unless_migratable(engine, state, auto_migrate)
        backup = _backup_sqlite(engine, state.current) if state.current and not is_postgres(engine) else None
        upgrade_database(engine.url.render_as_string(hide_password=False))
    url = engine.url.render_as_string(hide_password=True)
    revision = "+".join(sorted(state.expected))
    if not state.current:
        logger.info("created the catalog schema in %s (revision %s)", url, revision)
    elif backup is not None:
        logger.warning(
            "upgraded the catalog %s from revision %s to %s; the catalog as it was is backed up at %s",
            url,
            "+".join(sorted(state.current)),
            revision,
            backup,
        )
    else:
        logger.warning(
            "upgraded the catalog %s from revision %s to %s", url, "+".join(sorted(state.current)), revision
        )


def _refuse_unless_migratable(engine: Engine, state: SchemaState, auto_migrate: bool) -> None:
    url = engine.url.render_as_string(hide_password=True)
    if state.current - state.known:
        raise DatabaseNotMigratedError(
            f"the database {url} is at revision {sorted(state.current)}, which this version of the code does "
            "not know; it was migrated by a newer release, so upgrade the code"
        )
    if not state.current and state.has_tables:
        raise DatabaseNotMigratedError(
            f"the database {url} has tables but no catalog schema revision (no alembic_version row): it is "
            "not a catalog, or creating one was interrupted; use an empty database, or a new data directory"
        )
    if state.current and is_postgres(engine) and not auto_migrate:
        raise DatabaseNotMigratedError(
            f"the database {url} is at revision {sorted(state.current)} but the code expects "
            f"{sorted(state.expected)}; run `indexer migrate` once (or `alembic upgrade head`), or set "
            f"{AUTO_MIGRATE_ENV}=true to let the service and the indexer upgrade it when they start"
        )


@contextmanager
def migration_lock(engine: Engine) -> Iterator[None]:
    """Held while one process migrates; the others wait here for it."""
    if is_postgres(engine):
        # A session-level advisory lock on a connection of its own (Alembic migrates on another one);
        # autocommit so that the waiting connection does not sit idle in a transaction.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": PG_MIGRATION_LOCK_KEY})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PG_MIGRATION_LOCK_KEY})
        return
    path = _sqlite_path(engine)
    if path is None:  # in-memory: nobody else can see it
        yield
        return
    # A file of its own: SQLite's own locks on the catalog are fcntl locks, which flock must not disturb.
    with open(path.with_name(path.name + ".migrate-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sqlite_path(engine: Engine) -> Path | None:
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _backup_sqlite(engine: Engine, current: frozenset[str]) -> Path | None:
    """A consistent copy of the catalog (WAL included) beside it, named by its revision and the time."""
    path = _sqlite_path(engine)
    if path is None:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.bak-{'+'.join(sorted(current))}-{stamp}")
    source, copy = sqlite3.connect(path), sqlite3.connect(target)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()
    return target
