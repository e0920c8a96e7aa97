"""The catalog schema at start-up, through the CLI: created when empty, upgraded when older, refused when not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.postgres import BACKENDS
from sqlalchemy import text

from indexer.cli import main
from indexer.db import make_engine, upgrade_database

REPO = Path(__file__).resolve().parents[2]


def _revision(url: str) -> str:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return str(connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one())
    finally:
        engine.dispose()


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.delenv("TVS_DATABASE_URL", raising=False)
    monkeypatch.delenv("TVS_AUTO_MIGRATE", raising=False)

    def run(command: str, *args: str) -> tuple[int, str, str]:
        code = main([command, "--data-dir", str(tmp_path / "data"), *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_an_empty_database_gets_the_schema(cli, db_url: str) -> None:
    code, out, err = cli("stats", "--database-url", db_url, "--json")
    assert code == 0, err
    assert json.loads(out)["segments"] == 0
    assert cli("migrate", "--database-url", db_url)[0] == 0, "migrate on a current schema is a no-op"


def test_an_older_sqlite_catalog_is_backed_up_then_upgraded(
    cli,
    tmp_path: Path,
    sqlite_template: Path,
    newer_release: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    old, new = newer_release
    catalog = tmp_path / "data" / "catalog.db"
    catalog.parent.mkdir()
    shutil.copyfile(sqlite_template, catalog)

    code, _, err = cli("stats")
    assert code == 0, err
    assert _revision(f"sqlite:///{catalog}") == new
    (backup,) = catalog.parent.glob(f"catalog.db.bak-{old}-*")
    assert _revision(f"sqlite:///{backup}") == old, "the backup is the catalog as it was"
    assert str(backup) in caplog.text, "the log says where the backup is"

    caplog.clear()
    assert cli("stats")[0] == 0
    assert len(list(catalog.parent.glob("catalog.db.bak-*"))) == 1, "a current catalog is not copied again"


@pytest.mark.postgres
def test_an_older_postgres_schema_is_upgraded_only_with_auto_migrate(
    cli, postgres_url: str, newer_release: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = newer_release
    upgrade_database(postgres_url, old)
    db = ["--database-url", postgres_url]

    code, _, err = cli("stats", *db)
    assert code == 2 and "indexer migrate" in err and "TVS_AUTO_MIGRATE=true" in err, err
    assert _revision(postgres_url) == old, "refused means untouched"

    monkeypatch.setenv("TVS_AUTO_MIGRATE", "maybe")
    code, _, err = cli("stats", *db)
    assert code == 2 and "TVS_AUTO_MIGRATE='maybe': Input should be a valid boolean" in err, err

    monkeypatch.setenv("TVS_AUTO_MIGRATE", "true")
    assert cli("stats", *db)[0] == 0
    assert _revision(postgres_url) == new


@pytest.mark.postgres
def test_migrate_upgrades_an_older_postgres_schema(
    cli, postgres_url: str, newer_release: tuple[str, str]
) -> None:
    old, new = newer_release
    upgrade_database(postgres_url, old)
    code, out, _ = cli("migrate", "--database-url", postgres_url, "--json")
    assert code == 0 and "migrated" in json.loads(out)
    assert _revision(postgres_url) == new


def test_a_database_of_something_else_is_refused(cli, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'other.db'}"
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE invoices (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    code, _, err = cli("stats", "--database-url", url)
    assert code == 2 and "has tables but no catalog schema revision" in err


def test_a_catalog_from_a_newer_release_is_refused(cli, migrated_sqlite_url: str) -> None:
    engine = make_engine(migrated_sqlite_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'ffff_from_the_future'"))
    engine.dispose()
    code, _, err = cli("stats", "--database-url", migrated_sqlite_url)
    assert code == 2 and "newer release" in err


# Each process imports the CLI, says it is ready, then waits for the go file: their start-ups overlap.
RACER = """
import os, pathlib, sys, time
from indexer.cli import main
pathlib.Path(sys.argv[2]).touch()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.002)
sys.exit(main(["stats", "--json", *sys.argv[3:]]))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_processes_starting_together_on_an_empty_database_all_succeed(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{backend}_url")
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("TVS_AUTO_MIGRATE", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(go), str(tmp_path / f"ready{i}")]
            + ["--data-dir", str(tmp_path / f"data{i}"), "--database-url", url],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(3)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    for code, out, err in results:
        assert code == 0 and json.loads(out)["segments"] == 0, err
