"""Bringing files in: find videos, hash them, store them durably, and queue an ingest job; and deleting.

A little over 400 lines: taking a file in and deleting a video share the storage rules (copy, move or in
place; what a crash between steps leaves), which read best side by side.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog, jobs
from indexer.catalog import Change, Job, Segment, Video
from indexer.db import session_scope
from indexer.errors import IndexerError, UserError
from indexer.paths import SIDECAR_EXTENSIONS, VIDEO_EXTENSIONS, DataDir, fsync_dir
from indexer.token_store import TokenStore
from model.video.formats import EMPTY, sniff_file

logger = logging.getLogger(__name__)

StoreMode = Literal["copy", "move", "in_place"]
_CHUNK = 1 << 20


class SegmentDeleter(Protocol):
    """A vector database whose rows follow the catalog's deletes (indexer.milvus_index.MilvusIndex)."""

    def delete(self, ids: Iterable[int]) -> None: ...


class IngestError(IndexerError, UserError):
    """A file cannot be taken in (missing, not a regular file, unreadable)."""

    code = "not_a_video"


class JobGoneError(IndexerError, RuntimeError):
    """The job a download belongs to was cancelled (or taken over) before its video was registered."""


@dataclass(frozen=True)
class IngestResult:
    video_id: int
    job_id: int | None
    status: str  # the video's status: "pending" for a new video, the existing one's for a duplicate
    duplicate_of: int | None  # the existing video when the same bytes were ingested before


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex digest, size in bytes), reading in 1 MiB chunks so memory stays flat on any file size."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


@dataclass(frozen=True)
class Found:
    path: Path
    # Check with FFmpeg before ingesting: the bytes look like a video container but the name does not say so.
    probe: bool = False


@dataclass
class Scan:
    found: list[Found] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # file -> why it is not taken


def scan(paths: Iterable[str | os.PathLike[str]], recursive: bool = True) -> Scan:
    """The videos named by files, folders (walked) or globs, and the files passed over with the reason.

    A file named explicitly is taken whatever it holds. A file found in a folder or by a glob is taken when
    its first bytes look like a video container, or when it has a video suffix and its bytes are not
    something else (an image, text, audio…); no file is opened with FFmpeg here. Hidden files and folders
    are not looked at; sidecar files (subtitles, camera thumbnails and proxies) are skipped unread.
    """
    found: dict[Path, Found] = {}
    skipped: dict[Path, str] = {}
    for raw in paths:
        text = os.fspath(raw)
        path = Path(text).expanduser()
        if path.is_dir():
            matches = [path]
        elif path.is_file():
            found.setdefault(path.resolve(), Found(path.resolve()))  # named explicitly: taken as it is
            continue
        elif glob.has_magic(text):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(text), recursive=True))]
        else:
            matches = []
        if not matches:
            raise FileNotFoundError(f"{text}: no such file or folder, and no file matches it as a glob")
        for match in matches:
            for file in _walk(match, recursive) if match.is_dir() else [match]:
                if not file.is_file() or file.resolve() in found:
                    continue
                verdict = _classify(file)
                if isinstance(verdict, Found):
                    found[verdict.path] = verdict
                else:
                    skipped.setdefault(file.resolve(), verdict)
    return Scan(list(found.values()), {str(p): why for p, why in skipped.items() if p not in found})


def discover(paths: Iterable[str | os.PathLike[str]], recursive: bool = True) -> list[Path]:
    """The video files of `scan`, in order, without duplicates."""
    return [f.path for f in scan(paths, recursive).found]


def classify(file: Path) -> Found | str:
    """What a folder scan makes of one file: a Found for a likely video, else the reason it is skipped."""
    if file.name.startswith("."):
        return "hidden file"
    return _classify(file)


def _classify(file: Path) -> Found | str:
    """A Found for a likely video, else the reason to skip it (from the name and the first bytes only)."""
    suffix = file.suffix.lower()
    if suffix in SIDECAR_EXTENSIONS:
        return f"sidecar file ({suffix})"
    try:
        signature = sniff_file(file)
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    if signature.format is not None:
        return Found(file.resolve(), probe=suffix not in VIDEO_EXTENSIONS)
    if signature.mime == EMPTY:
        return "empty file"
    if signature.known:
        return f"not a video ({signature.mime})"
    if suffix in VIDEO_EXTENSIONS:
        return Found(file.resolve())  # an unfamiliar signature, but named as a video: FFmpeg decides
    return "not a video (unknown format)"


def _walk(folder: Path, recursive: bool) -> list[Path]:
    """Files under `folder`, sorted; hidden folders are not entered (dot files are partial downloads,
    editor droppings and tool caches, not library content)."""
    out: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [] if not recursive else [d for d in dirs if not d.startswith(".")]
        out.extend(Path(root, f) for f in files if not f.startswith("."))
    return sorted(out)


def _durable_copy(src: Path, dest: Path, tmp_dir: Path) -> None:
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f".{dest.name}.{uuid.uuid4().hex[:8]}.part"
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, _CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def store_file(data: DataDir, src: Path, sha256: str, mode: StoreMode) -> Path:
    """Put the file where the catalog will point (fsynced), returning that path."""
    if mode == "in_place":
        return src.resolve()
    if mode not in ("copy", "move"):
        raise ValueError(f"mode must be 'copy', 'move' or 'in_place', got {mode!r}")
    dest = data.stored_video(sha256, src.suffix)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if mode == "move":
        try:
            os.replace(src, dest)
            with open(dest, "rb") as f:
                os.fsync(f.fileno())
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            _durable_copy(src, dest, data.incoming)  # another file system: copy, then drop the source
            src.unlink()
    else:
        _durable_copy(src, dest, data.incoming)
    fsync_dir(dest.parent)
    return dest


def _latest_job_id(session: Session, video_id: int) -> int | None:
    return session.scalar(select(Job.id).where(Job.video_id == video_id).order_by(Job.id.desc()).limit(1))


def _duplicate(session: Session, video: Video) -> IngestResult:
    return IngestResult(video.id, _latest_job_id(session, video.id), video.status, duplicate_of=video.id)


def ingest_file(
    session_factory: sessionmaker[Session],
    data: DataDir,
    path: str | os.PathLike[str],
    *,
    model_id: str,
    title: str | None = None,
    source: str | None = None,
    meta: dict[str, Any] | None = None,
    mode: StoreMode = "copy",
    max_attempts: int = 3,
    retry_failed: bool = False,
    job: tuple[int, str] | None = None,
) -> IngestResult:
    """Hash, dedupe, store and queue one file; the video row and its job commit in one transaction.

    `job`: (job id, worker id) of a running URL job that downloaded the file: the new video is attached
    to that job instead of a new one being queued (JobGoneError, nothing kept, if the job is no longer ours).

    `mode`: "copy" into the data directory, "move" (an upload already under incoming/), or
    "in_place" (a library file the catalog points at where it is). The same bytes ingested again
    create nothing new (race-free: the catalog's unique sha256 decides between concurrent callers),
    except that a deleted video comes back, and a failed one is tried again with `retry_failed`.
    """
    src = Path(path).expanduser()
    if not src.is_file():
        raise IngestError(f"{src} is not a regular file; pass a video file (or a folder to `indexer add`)")
    try:
        sha256, size = sha256_file(src)
    except OSError as e:
        raise IngestError(f"cannot read {src}: {e.strerror or e}; check the file's permissions") from e

    def taken(video: Video | None) -> bool:
        return (
            video is not None
            and video.status != "deleted"
            and not (retry_failed and video.status == "failed")
        )

    with session_scope(session_factory) as session:
        existing = catalog.get_video_by_sha256(session, sha256)
        if existing is not None and taken(existing):
            result = _duplicate(session, existing)
    if taken(existing):
        if mode == "move":
            src.unlink(missing_ok=True)  # an upload whose bytes we already hold
        logger.info("%s is a duplicate of video %s", src, result.video_id)
        return result
    stored = store_file(data, src, sha256, mode)
    stored_rel = data.relative(stored)
    try:
        result = _register(session_factory, src, sha256, size, stored_rel, taken, source, title, meta, model_id,
                           max_attempts, job)  # fmt: skip
    except JobGoneError:
        if mode != "in_place":
            stored.unlink(missing_ok=True)
        raise
    if result.duplicate_of is not None and mode == "move":
        src.unlink(missing_ok=True)
    logger.info("ingested %s as video %s (job %s)", src, result.video_id, result.job_id)
    return result


def _queue(
    session: Session, video_id: int, model_id: str, max_attempts: int, job: tuple[int, str] | None
) -> int:
    """A new ingest job for the video, or the running URL job `job` (id, worker) taking it on."""
    if job is None:
        return jobs.enqueue(session, "ingest", video_id, model_id, max_attempts=max_attempts).id
    job_id, worker_id = job
    if jobs.attach_video(session, job_id, video_id, worker_id=worker_id) is None:
        raise JobGoneError(f"job {job_id} was cancelled or taken over during its download")
    return job_id


def _register(
    session_factory: sessionmaker[Session],
    src: Path,
    sha256: str,
    size: int,
    stored_rel: str,
    taken: Any,
    source: str | None,
    title: str | None,
    meta: dict[str, Any] | None,
    model_id: str,
    max_attempts: int,
    job: tuple[int, str] | None,
) -> IngestResult:
    """The video row (new, revived, or a duplicate found in a race) and its job, in one transaction."""
    with session_scope(session_factory) as session:
        values: dict[str, Any] = dict(
            source=source or str(src.resolve()),
            title=title or src.stem,
            stored_path=stored_rel,
            filename=src.name,
            size_bytes=size,
            meta=meta or {},
        )
        video, new = catalog.create_video(session, sha256=sha256, **values)
        if not new:  # lock the row: two callers reviving the same video must not both queue a job
            session.refresh(video, with_for_update=True)
        if not new and taken(video):
            result = _duplicate(session, video)  # lost a race with another ingest of the same bytes
        else:
            if not new:  # deleted (or failed) earlier, ingested again: the same row comes back to life
                for key, value in values.items():
                    setattr(video, key, value)
                video.status, video.error = "pending", None
            result = IngestResult(
                video.id, _queue(session, video.id, model_id, max_attempts, job), "pending", None
            )
    return result


def delete_video(
    session_factory: sessionmaker[Session],
    data: DataDir,
    video_id: int,
    *,
    sink: SegmentDeleter | None = None,
) -> list[int] | None:
    """Delete a video from the catalog (it leaves search at once), then free its tokens, thumbnails and file.

    With a vector database (`sink`) its rows there are deleted too; the searcher already drops them, since
    it keeps only hits the catalog has, so a failure here only leaves rows that verify --repair removes.

    Returns the freed segment ids, or None if there is no such video. Freeing is best effort: what a
    crash leaves behind is found and freed by `indexer verify --repair`.
    """
    with session_scope(session_factory) as session:
        rows = session.execute(select(Segment.id, Segment.model_id).where(Segment.video_id == video_id)).all()
        freed = catalog.delete_video(session, video_id)
        if freed is None:
            return None
        video = catalog.get_video(session, video_id)
        stored = video.stored_path if video is not None else None
    by_model: dict[str, list[int]] = {}
    for seg_id, model_id in rows:
        by_model.setdefault(model_id, []).append(seg_id)
    if sink is not None:
        try:
            sink.delete([seg_id for seg_id, _ in rows])
        except Exception as e:  # the catalog delete already took it out of search
            logger.warning("video %s deleted, but not yet from the vector database (%s)", video_id, e)
    try:
        purge_video_files(session_factory, data, video_id, by_model, stored)
    except OSError as e:
        logger.warning(
            "video %s deleted, but freeing its files failed (%s); run `indexer verify --repair`", video_id, e
        )
    return freed


def purge_video_files(
    session_factory: sessionmaker[Session],
    data: DataDir,
    video_id: int,
    segments_by_model: dict[str, list[int]],
    stored_path: str | None,
) -> None:
    """Free a deleted video's token records, thumbnails and stored copy (never a user's in-place file)."""
    for model_id, ids in segments_by_model.items():
        with session_scope(session_factory) as session:
            model = catalog.get_model(session, model_id)
        root = data.tokens_dir(model_id)
        if model is None or not root.is_dir():
            continue
        with TokenStore(root, model.num_frames, model.dim) as store:
            store.free(ids)
            store.flush()
    shutil.rmtree(data.thumb_dir(video_id), ignore_errors=True)
    if stored_path is None or Path(stored_path).is_absolute():
        return
    with session_scope(session_factory) as session:
        video = catalog.get_video(session, video_id)
        # The same bytes may have been ingested again since (the row revived, pointing at this file).
        still_deleted = video is None or video.status == "deleted"
    if still_deleted:
        data.resolve(stored_path).unlink(missing_ok=True)


def delete_segments(session: Session, video_id: int, model_id: str) -> list[int]:
    """Drop one model's segments of a video, with their `delete` changes, in the caller's transaction."""
    ids = list(
        session.scalars(select(Segment.id).where(Segment.video_id == video_id, Segment.model_id == model_id))
    )
    if ids:
        session.execute(delete(Segment).where(Segment.id.in_(ids)))
        session.add_all(Change(segment_id=i, video_id=video_id, op="delete", model_id=model_id) for i in ids)
        session.flush()
    return ids


def release_pending(
    session_factory: sessionmaker[Session], data: DataDir, model_id: str, video_id: int, store: TokenStore
) -> list[int]:
    """Free the journalled records of a video that never reached the catalog; returns the freed ids."""
    ids = data.pending(model_id).get(video_id)
    if ids is None:
        return []
    with session_scope(session_factory) as session:
        committed = set(session.scalars(select(Segment.id).where(Segment.id.in_(ids))))
    orphans = [i for i in ids if i not in committed]
    if orphans:
        store.free(orphans)
        store.flush()
    data.clear_pending(model_id, video_id)
    return orphans
