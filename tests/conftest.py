"""Fixtures every test folder shares: is PostgreSQL there, and a migrated SQLite catalog to copy; `gpu`
tests skip, saying why, where faiss or torch cannot use a CUDA device."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.postgres import admin_engine, postgres_admin_url

from indexer.db import upgrade_database


def pytest_configure(config: pytest.Config) -> None:
    # A developer's .env (made for compose) must not reach the tests' settings; tests that read a dotenv file
    # name it with TVS_ENV_FILE themselves.
    os.environ["TVS_ENV_FILE"] = ""


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is None:
        return
    import torch

    from indexer.faiss_parts import gpu_unavailable_reason

    reason = gpu_unavailable_reason(0)
    if reason is None and not torch.cuda.is_available():
        reason = f"torch {torch.__version__} sees no CUDA device"
    if reason is not None:
        pytest.skip(f"gpu test: {reason}")


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


NEXT_REVISION = '''"""Test only: a release after this one, whose migration adds a table.

Revision ID: {revision}
Revises: {down}
"""

import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("upgrade_probe", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("upgrade_probe")
'''


@pytest.fixture
def newer_release(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str]:
    """The code as a release with one more migration than this one: `(old head, new head)`.

    A catalog at today's head is then an older schema, which is what a user has after upgrading the code.
    """
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    import indexer.db

    config = Config()
    config.set_main_option("script_location", str(indexer.db.MIGRATIONS_DIR))
    (head,) = ScriptDirectory.from_config(config).get_heads()
    new = f"{head}_next"
    copy = tmp_path_factory.mktemp("release") / "migrations"
    shutil.copytree(indexer.db.MIGRATIONS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "versions" / f"{new}.py").write_text(NEXT_REVISION.format(revision=new, down=head))
    monkeypatch.setattr(indexer.db, "MIGRATIONS_DIR", copy)
    return head, new


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Milvus server shared by the session: TVS_TEST_MILVUS_URI, else Milvus Lite on a loopback port.

    Tests keep apart by collection prefix (`milvus_prefix`), so one start-up serves them all.
    """
    from helpers.milvus import lite_server, real_server_uri

    if (uri := real_server_uri()) is not None:
        yield uri
        return
    pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (pip install -e '.[milvus]')")
    with lite_server(tmp_path_factory.mktemp("milvus")) as uri:
        yield uri


@pytest.fixture
def milvus_prefix(request: pytest.FixtureRequest) -> str:
    """A collection prefix of this test's own (31 characters: TVS_MILVUS_PREFIX allows 32), so tests sharing
    one server never see each other's rows."""
    import re
    import uuid

    return "t_" + re.sub(r"[^A-Za-z0-9]", "_", request.node.name)[:22] + "_" + uuid.uuid4().hex[:6]
