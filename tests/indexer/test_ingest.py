"""Ingesting files: hashing, dedupe (also under races), storage modes, discovery, and deletion."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog
from indexer.catalog import Change, Job, Segment, Video
from indexer.db import make_engine, make_session_factory, session_scope
from indexer.ingest import IngestError, delete_video, discover, ingest_file, scan, sha256_file
from indexer.paths import DataDir
from indexer.token_store import TokenStore
from indexer.worker import Worker
from model.checkpoint import load_model
from synth.generator import write_pattern_video

MODEL_ID = "tiny-test"


@pytest.fixture
def data(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path / "data").ensure()


@pytest.fixture
def video(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    return write_pattern_video(tmp_path / "src" / "clip.mp4", 1.0, 64, 48, 8, gop=8)


def _count(factory: sessionmaker[Session], entity: type) -> int:
    with session_scope(factory) as session:
        return session.scalar(select(func.count()).select_from(entity)) or 0


def test_same_file_twice_creates_nothing_new(
    session_factory: sessionmaker[Session], data: DataDir, video: Path
) -> None:
    first = ingest_file(session_factory, data, video, model_id=MODEL_ID, mode="copy")
    second = ingest_file(session_factory, data, video, model_id=MODEL_ID, mode="copy")
    assert first.duplicate_of is None and first.status == "pending" and first.job_id is not None
    assert second.duplicate_of == second.video_id == first.video_id
    assert second.job_id == first.job_id
    assert (_count(session_factory, Video), _count(session_factory, Job)) == (1, 1)
    stored = [p for p in data.videos.rglob("*") if p.is_file()]
    assert len(stored) == 1 and stored[0].read_bytes() == video.read_bytes()
    assert stored[0].stem == sha256_file(video)[0]
    assert not [p for p in data.incoming.iterdir()], "no partial copies are left behind"


def test_racing_ingests_of_one_file_end_with_one_video(
    migrated_db_url: str, data: DataDir, video: Path
) -> None:
    engine = make_engine(migrated_db_url)
    factory = make_session_factory(engine)
    barrier, results, errors = threading.Barrier(4), [], []

    def ingest() -> None:
        barrier.wait()
        try:
            results.append(ingest_file(factory, data, video, model_id=MODEL_ID, mode="copy"))
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=ingest) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    assert not errors
    assert len({r.video_id for r in results}) == 1
    assert sum(r.duplicate_of is None for r in results) == 1
    assert (_count(factory, Video), _count(factory, Job)) == (1, 1)
    assert len([p for p in data.videos.rglob("*") if p.is_file()]) == 1


def test_storage_modes(session_factory: sessionmaker[Session], data: DataDir, tmp_path: Path) -> None:
    upload = write_pattern_video(tmp_path / "upload.mp4", 1.0, 64, 48, 8, gop=8)
    moved = ingest_file(session_factory, data, upload, model_id=MODEL_ID, mode="move")
    assert not upload.exists()
    library = write_pattern_video(tmp_path / "library.mp4", 1.5, 64, 48, 8, gop=8)
    in_place = ingest_file(session_factory, data, library, model_id=MODEL_ID, mode="in_place", title="Lib")
    with session_scope(session_factory) as session:
        stored_moved = session.get(Video, moved.video_id).stored_path
        row = session.get(Video, in_place.video_id)
        assert (row.stored_path, row.title, row.filename) == (str(library.resolve()), "Lib", "library.mp4")
    assert data.resolve(stored_moved).is_file() and not Path(stored_moved).is_absolute()
    # A duplicate upload handed over with "move" is dropped: its bytes are already stored.
    again = write_pattern_video(tmp_path / "again.mp4", 1.0, 64, 48, 8, gop=8)
    assert (
        ingest_file(session_factory, data, again, model_id=MODEL_ID, mode="move").duplicate_of
        == moved.video_id
    )
    assert not again.exists()


def test_a_missing_file_is_refused_with_a_reason(
    session_factory: sessionmaker[Session], data: DataDir
) -> None:
    with pytest.raises(IngestError, match="not a regular file"):
        ingest_file(session_factory, data, data.root / "nope.mp4", model_id=MODEL_ID)


def test_discover_files_folders_and_globs(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    mp4_head = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
    for rel in [
        "a.mp4",
        "b.MKV",
        "notes.txt",
        "sub/c.webm",
        "sub/deeper/d.mov",
        ".hidden/e.mp4",
        "sub/.f.mp4",
    ]:
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_bytes(mp4_head if rel != "notes.txt" else b"a shot list\n")
    names = lambda paths: sorted(p.name for p in paths)  # noqa: E731
    assert names(discover([lib])) == ["a.mp4", "b.MKV", "c.webm", "d.mov"]
    assert names(discover([lib], recursive=False)) == ["a.mp4", "b.MKV"]
    assert names(discover([str(lib / "**" / "*.webm")])) == ["c.webm"]
    # Named explicitly, a file is taken whatever its extension; duplicates collapse.
    assert names(discover([lib / "notes.txt", lib / "a.mp4", lib])) == [
        "a.mp4",
        "b.MKV",
        "c.webm",
        "d.mov",
        "notes.txt",
    ]
    with pytest.raises(FileNotFoundError, match="no such file"):
        discover([tmp_path / "missing"])


def test_a_scan_takes_videos_by_content_and_says_why_it_skips_the_rest(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    (lib / "cam").mkdir(parents=True)
    mp4_head = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
    files = {
        "cam/0001.MTS": bytes([0x47]) + bytes(187) + bytes([0x47]) + bytes(187) + bytes([0x47]) + bytes(200),
        "cam/0001.THM": b"\xff\xd8\xff\xe0",  # a camera's thumbnail: skipped unread
        "renamed.dat": mp4_head,
        "no_suffix": mp4_head,
        "photo.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF",
        "named.mp4": b"\xff\xd8\xff\xe0\x00\x10JFIF",  # a photo with a video's name
        "odd.mp4": bytes(range(256)),  # an unknown signature with a video's name: FFmpeg decides
        "blob.bin": bytes(range(256)),
        "empty.mov": b"",
        ".git/objects/ab": mp4_head,  # hidden folders are not entered
    }
    for rel, data in files.items():
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_bytes(data)
    found = scan([lib])
    by_name = {f.path.name: f.probe for f in found.found}
    # Only the files whose name does not say "video" are checked with FFmpeg before they are taken.
    assert by_name == {"0001.MTS": False, "renamed.dat": True, "no_suffix": True, "odd.mp4": False}
    assert {Path(p).name: why for p, why in found.skipped.items()} == {
        "0001.THM": "sidecar file (.thm)",
        "photo.jpg": "not a video (image/jpeg)",
        "named.mp4": "not a video (image/jpeg)",
        "blob.bin": "not a video (unknown format)",
        "empty.mov": "empty file",
    }
    # Named explicitly, a file is taken as it is.
    assert [(f.path.name, f.probe) for f in scan([lib / "photo.jpg"]).found] == [("photo.jpg", False)]


def test_delete_video_vanishes_then_frees_its_files(
    migrated_sqlite_url: str, data: DataDir, video: Path
) -> None:
    factory = make_session_factory(make_engine(migrated_sqlite_url))
    model = load_model("tiny")
    result = ingest_file(factory, data, video, model_id=model.model_id, mode="copy")
    worker = Worker(factory, data, model)
    assert worker.run_once()
    worker.close()
    with session_scope(factory) as session:
        seg_ids = list(session.scalars(select(Segment.id).where(Segment.video_id == result.video_id)))
        stored = data.resolve(session.get(Video, result.video_id).stored_path)
    store = TokenStore(data.tokens_dir(model.model_id), 4, 32, readonly=True)
    assert (
        seg_ids and store.has(seg_ids).all() and stored.exists() and data.thumb_dir(result.video_id).is_dir()
    )

    assert delete_video(factory, data, result.video_id) == seg_ids
    with session_scope(factory) as session:
        assert session.get(Video, result.video_id).status == "deleted"
        assert not session.scalars(select(Segment).where(Segment.video_id == result.video_id)).all()
        ops = session.execute(select(Change.segment_id, Change.op).order_by(Change.seq)).all()
    assert [op for _, op in ops] == ["add"] * len(seg_ids) + ["delete"] * len(seg_ids)
    assert not store.has(seg_ids).any()
    assert not stored.exists() and not data.thumb_dir(result.video_id).exists()
    assert delete_video(factory, data, 12345) is None

    # The same bytes ingested again bring the row back with a new job.
    revived = ingest_file(factory, data, video, model_id=model.model_id, mode="copy")
    assert (revived.video_id, revived.duplicate_of, revived.status) == (result.video_id, None, "pending")
    assert stored.exists()


def test_a_failed_video_is_tried_again_only_when_asked(
    session_factory: sessionmaker[Session], data: DataDir, video: Path
) -> None:
    first = ingest_file(session_factory, data, video, model_id=MODEL_ID)
    with session_scope(session_factory) as session:
        catalog.set_video_status(session, first.video_id, "failed", error="decoder crashed")
    again = ingest_file(session_factory, data, video, model_id=MODEL_ID)
    assert (again.status, again.job_id, again.duplicate_of) == ("failed", first.job_id, first.video_id)
    retried = ingest_file(session_factory, data, video, model_id=MODEL_ID, retry_failed=True)
    assert (retried.video_id, retried.status, retried.duplicate_of) == (first.video_id, "pending", None)
    assert retried.job_id != first.job_id and _count(session_factory, Job) == 2
