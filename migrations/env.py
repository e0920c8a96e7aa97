"""Alembic environment: migrates the catalog (indexer.catalog's metadata) on SQLite or PostgreSQL."""

import logging
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

from indexer.catalog import Base
from indexer.db import default_database_url

logger = logging.getLogger(__name__)

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    """-x url=... wins, then a URL set on the config (upgrade_database), then TVS_DATABASE_URL."""
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    if os.environ.get("TVS_DATABASE_URL"):
        return os.environ["TVS_DATABASE_URL"]
    return default_database_url(os.environ.get("TVS_DATA_DIR", "data"))


def run_migrations_offline() -> None:
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = database_url()
    if url.startswith("sqlite"):
        # SQLite cannot create the folder of a new database file.
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # NullPool: a migration is a one-off; keep no connection open afterwards (PostgreSQL DROP DATABASE).
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            # Batch mode recreates tables to alter them on SQLite, which lacks most ALTER TABLE forms.
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


# Only the alembic command line has an ini file; logging is left alone when called from code or tests.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
