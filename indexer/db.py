"""Database engines, sessions and the Alembic entry points for the catalog."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Dialect, Engine, TypeDecorator, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from indexer.errors import IndexerError, UserError

logger = logging.getLogger(__name__)

# How long a SQLite connection waits for another writer before raising "database is locked".
SQLITE_BUSY_TIMEOUT_S = 30.0

# The migrations folder sits next to the `indexer` package both in a checkout (editable install)
# and in an installed wheel, so it is found without depending on the current directory.
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware one, e.g. datetime.now(timezone.utc)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class DatabaseNotMigratedError(IndexerError, UserError, RuntimeError):
    """The database schema is missing or not at the revision this code expects."""


def default_database_url(data_dir: str | Path) -> str:
    """The SQLite catalog inside the data directory."""
    return f"sqlite:///{Path(data_dir) / 'catalog.db'}"


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL lets readers (API replicas) proceed while one writer (a worker) commits.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        # NORMAL is durable across application crashes in WAL mode; only a power loss can drop
        # the last transactions, and the token store is written before the catalog commit anyway.
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for a SQLite file or PostgreSQL (`postgresql+psycopg://`) URL.

    Extra keyword arguments go to `sqlalchemy.create_engine`.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = kwargs.pop("connect_args", {})
        # Sessions are handed between threads (API thread pool, worker thread); the pool makes sure
        # one connection is used by one thread at a time.
        connect_args.setdefault("check_same_thread", False)
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql":
        # pre_ping replaces connections that died while the server restarted or the network blipped.
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(url, **kwargs)
    raise ValueError(
        f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: "
        "expected sqlite:///path/to/catalog.db or postgresql+psycopg://user:pass@host/dbname"
    )


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: rows returned by data functions stay readable after session_scope ends.
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise FileNotFoundError(
            f"Alembic migrations not found at {MIGRATIONS_DIR}; reinstall the package "
            "(pip install -e .) so that the migrations folder sits next to the indexer package"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates '%', which URL-encoded passwords contain.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    """Run the Alembic migrations up to `revision` (what `indexer migrate` does)."""
    from alembic import command

    logger.info("upgrading database %s to %s", make_url(url).render_as_string(), revision)
    command.upgrade(_alembic_config(url), revision)


def downgrade_database(url: str, revision: str) -> None:
    """Run the Alembic migrations down to `revision` (`base` removes every table)."""
    from alembic import command

    logger.info("downgrading database %s to %s", make_url(url).render_as_string(), revision)
    command.downgrade(_alembic_config(url), revision)


def schema_revisions(engine: Engine) -> tuple[set[str], set[str], set[str]]:
    """The database's current Alembic revisions, the code's heads, and every revision the code knows."""
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config(engine.url.render_as_string(hide_password=True)))
    with engine.connect() as connection:
        current = set(MigrationContext.configure(connection).get_current_heads())
    return current, set(script.get_heads()), {rev.revision for rev in script.walk_revisions()}


def check_schema_current(engine: Engine) -> None:
    """Raise DatabaseNotMigratedError unless the database is at the newest migration."""
    url = engine.url.render_as_string(hide_password=True)
    current, expected, known = schema_revisions(engine)
    if current == expected:
        return
    if not current:
        raise DatabaseNotMigratedError(
            f"the database {url} has no catalog schema; create it with `indexer migrate` "
            "(or `alembic upgrade head`) before starting the service or a worker"
        )
    if current - known:
        raise DatabaseNotMigratedError(
            f"the database {url} is at revision {sorted(current)}, which this version of the code does not "
            "know; it was migrated by a newer release, so upgrade the code"
        )
    raise DatabaseNotMigratedError(
        f"the database {url} is at revision {sorted(current)} but the code expects {sorted(expected)}; "
        "run `indexer migrate` (or `alembic upgrade head`)"
    )
