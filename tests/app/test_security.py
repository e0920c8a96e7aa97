"""Security: API keys (no hints, never logged), files served only from where they belong, no SQL from strings."""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import pytest
from sqlalchemy import create_engine, update

from app.settings import Settings
from indexer.catalog import Segment, Video

KEY = "s3cret-key-" + "x" * 21
REPO = Path(__file__).resolve().parents[2]
SQL_SINKS = {"text", "exec_driver_sql", "execute", "executemany", "executescript", "literal_column"}


def test_a_wrong_key_gets_the_same_401_whatever_is_wrong(service, clips, api) -> None:
    with service(api_key=KEY) as client:
        answers = set()
        for wrong in ("x", KEY[:-1], KEY + "x", KEY.upper(), KEY[1:], "é" * 8):
            raw = wrong.encode("latin-1")  # a non-ASCII key goes on the wire as raw bytes
            for headers in ({"X-API-Key": raw}, {"Authorization": b"Bearer " + raw}):
                r = api.upload(client, clips[0]["path"], **headers)
                assert r.status_code == 401, (wrong, r.status_code)
                assert KEY not in r.text and wrong.strip() not in r.json()["detail"]
                answers.add((r.text, r.headers.get("www-authenticate")))
        assert len(answers) == 1, f"every wrong key gets the same answer, got {answers}"
        r = client.delete("/videos/1", headers={"X-API-Key": "nope"})
        assert (r.status_code, (r.text, r.headers.get("www-authenticate"))) == (401, answers.pop())


def test_the_key_is_never_logged(service, clips, api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with service(api_key=KEY) as client:
        client.headers["X-API-Key"] = KEY  # for the helpers; a request's own header wins
        api.upload(client, clips[0]["path"], **{"X-API-Key": KEY + "-wrong"})
        ok = api.upload(client, clips[0]["path"], **{"X-API-Key": KEY})
        assert ok.status_code == 202
        api.wait_job(client, ok.json()["job_id"])
        client.delete("/videos/999", headers={"Authorization": f"Bearer {KEY}"})
        client.get("/health")
    records = [r.getMessage() for r in caplog.records]
    assert len(records) > 5, "the test saw the service's logs"
    assert not [m for m in records if KEY in m], "the API key appears in a log message"
    settings = Settings(api_key=KEY, model="tiny")
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())


def test_media_and_thumbnails_are_served_only_from_the_data_directory(service, clips, api, tmp_path) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"secret bytes outside the data directory")
    with service() as client:
        (video_id,) = api.ingest(client, [clips[0]["path"]])
        segment_id = client.get(f"/videos/{video_id}").json()["segments"][0]["id"]
        assert client.get(f"/videos/{video_id}/media").status_code == 200
        assert client.get(f"/segments/{segment_id}/thumbnail").status_code == 200
        data = tmp_path / "data"
        stored = next(data.glob("videos/*/*"))
        link = data / "videos" / "link.mp4"
        os.symlink(outside, link)
        engine = create_engine(client.app.state.settings.database_url)  # type: ignore[attr-defined]
        try:
            for escape in ("../outside.jpg", "videos/../../outside.jpg", str(link.relative_to(data))):
                with engine.begin() as connection:
                    connection.execute(update(Video).where(Video.id == video_id).values(stored_path=escape))
                    connection.execute(
                        update(Segment).where(Segment.id == segment_id).values(thumbnail=escape)
                    )
                for url in (f"/videos/{video_id}/media", f"/segments/{segment_id}/thumbnail"):
                    r = client.get(url)
                    assert r.status_code == 404 and b"secret" not in r.content, (escape, url)
            with engine.begin() as connection:
                connection.execute(
                    update(Video)
                    .where(Video.id == video_id)
                    .values(stored_path=str(stored.relative_to(data)))
                )
            assert client.get(f"/videos/{video_id}/media").status_code == 200
        finally:
            engine.dispose()


def test_upload_file_names_never_become_paths(service, clips, tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    with service() as client:
        for name in (f"../../../../{victim}/a.mp4", f"{victim}/b.mp4", "..", ".", "videos/../../c.mp4"):
            with open(clips[1]["path"], "rb") as f:
                r = client.post("/videos", files={"file": (name, f, "video/mp4")})
            assert r.status_code in (200, 202), r.text
    assert list(victim.iterdir()) == [], "nothing was written where the client's name pointed"
    data = tmp_path / "data"
    files = [p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file() and p.suffix == ".mp4"]
    assert len(files) == 1 and files[0].startswith("videos/"), files
    assert not list((data / "incoming").glob("*")), "no upload left in incoming/"


# --- no SQL built from strings ----------------------------------------------------------------------------
def _builds_a_string(node: ast.AST) -> bool:
    """An f-string, `%` or `+` on a string, or `.format()`; interpolating only int(...) is safe."""
    if isinstance(node, ast.JoinedStr):
        parts = [v.value for v in node.values if isinstance(v, ast.FormattedValue)]
        return any(not (isinstance(p, ast.Call) and getattr(p.func, "id", None) == "int") for p in parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        return any(
            isinstance(side, ast.JoinedStr)
            or (isinstance(side, ast.Constant) and isinstance(side.value, str))
            for side in (node.left, node.right)
        )
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"


def sql_built_from_strings(source: str) -> list[str]:
    """Calls that hand SQL sinks a string built at run time, directly or through a local variable."""
    found = []
    tree = ast.parse(source)
    scopes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.Module)]
    for scope in scopes:
        built_names = {
            target.id
            for node in ast.walk(scope)
            if isinstance(node, ast.Assign) and _builds_a_string(node.value)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(scope):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if name in SQL_SINKS and (
                _builds_a_string(arg) or (isinstance(arg, ast.Name) and arg.id in built_names)
            ):
                found.append(f"line {node.lineno}: {ast.unparse(node)[:100]}")
    return sorted(set(found))


def test_the_sql_check_finds_what_it_should() -> None:
    bad = """
def f(session, name, n):
    session.execute(text(f"SELECT * FROM videos WHERE title = '{name}'"))
    conn.exec_driver_sql("DELETE FROM jobs WHERE id = %s" % n)
    sql = "SELECT " + name
    session.execute(text(sql))
    cursor.execute("SELECT {}".format(name))
"""
    assert len(sql_built_from_strings(bad)) == 4
    good = """
def g(session, n):
    session.execute(text("SELECT 1"))
    session.execute(select(Video).where(Video.title == n))
    cursor.execute(f"PRAGMA busy_timeout={int(n * 1000)}")
    logger.info(f"not sql {n}")
"""
    assert sql_built_from_strings(good) == []


def test_no_sql_is_built_from_strings() -> None:
    files = [p for folder in ("app", "indexer", "model") for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 30
    offenders = {
        str(p.relative_to(REPO)): hits for p in files if (hits := sql_built_from_strings(p.read_text()))
    }
    assert offenders == {}, "build SQL with SQLAlchemy expressions or bound parameters, not strings"
