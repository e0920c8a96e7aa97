"""Bulk runs: `indexer add` (files, folders, globs) and `indexer reindex` (a library into a new model generation).

Both queue jobs, run them through an in-process Worker (or another engine, such as Ray for reindex), and
settle: every job ends in a state and the report says what was indexed, skipped or failed, and why.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog, jobs
from indexer.catalog import Job, Segment, Video, register_model
from indexer.db import session_scope
from indexer.failures import not_decodable
from indexer.feed_compaction import DEFAULT_RETENTION_S
from indexer.ingest import IngestError, StoreMode, ingest_file, scan
from indexer.live_index import save_snapshot
from indexer.milvus_index import MilvusIndex
from indexer.paths import DataDir
from indexer.pipeline import PipelineConfig, TaskResult, VectorSink, VideoTask
from indexer.worker import Worker
from model.openmp import release_openmp_threads
from model.tokenbinder import TokenBinder

logger = logging.getLogger(__name__)


@dataclass
class BulkReport:
    files: int = 0  # files (add) or videos (reindex) considered
    indexed: int = 0  # videos indexed by this run
    already: int = 0  # videos that were indexed before (same bytes seen earlier)
    segments: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # file (or video id) -> reason
    skipped: dict[str, str] = field(default_factory=dict)  # add: file found in a folder -> why it is no video
    switched: bool = False  # reindex: the model became the active one
    seconds: float = 0.0

    def skipped_by_reason(self) -> dict[str, int]:
        """Reason -> how many files were skipped for it, most first."""
        counts: dict[str, int] = {}
        for reason in self.skipped.values():
            counts[reason] = counts.get(reason, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"skipped_by_reason": self.skipped_by_reason()}


_OPEN_STATES = ("queued", *jobs.ACTIVE_STATES)


def _open_jobs(session_factory: sessionmaker[Session], job_ids: list[int]) -> int:
    with session_scope(session_factory) as session:
        return sum(
            session.scalar(
                select(func.count()).where(Job.id.in_(job_ids[i : i + 500]), Job.state.in_(_OPEN_STATES))
            )
            or 0
            for i in range(0, len(job_ids), 500)
        )


def add_paths(
    session_factory: sessionmaker[Session],
    data: DataDir,
    model: TokenBinder,
    paths: Iterable[str | os.PathLike[str]],
    *,
    mode: StoreMode = "in_place",
    recursive: bool = True,
    max_attempts: int = 3,
    retry_failed: bool = False,
    config: PipelineConfig | None = None,
    on_start: Callable[[int], None] | None = None,
    on_skip: Callable[[], None] | None = None,
    on_result: Callable[[TaskResult], None] | None = None,
    sink: VectorSink | None = None,
    feed_retention_s: float = DEFAULT_RETENTION_S,
) -> BulkReport:
    """Ingest files (folders, globs) and index them in this process; re-running after a crash completes the run.

    Indexing starts while later files are still being hashed. Files found in folders that are not videos
    FFmpeg can decode are skipped, each with the reason (`report.skipped`). Returns what happened to each file.
    """
    started = time.monotonic()
    register_model(session_factory, model, require_active=True)
    found = scan(paths, recursive)
    report = BulkReport(files=len(found.found) + len(found.skipped), skipped=found.skipped)
    if on_start is not None:
        on_start(len(found.found))
    # A short poll: the worker starts before the first job is queued and must not idle a second.
    worker = Worker(session_factory, data, model, poll_s=0.1, config=config, on_result=on_result, sink=sink)
    job_ids: list[int] = []
    by_video: dict[int, Path] = {}
    hashed = threading.Event()
    crashed: list[BaseException] = []

    def work() -> None:
        try:
            worker.run(until=lambda: hashed.is_set() and not _open_jobs(session_factory, job_ids))
        except BaseException as e:  # re-raised in the caller's thread below
            crashed.append(e)

    thread = threading.Thread(target=work, name="add-worker", daemon=True)
    # The model's encodes run in that thread from here: an OpenMP pool left alive in this one (loading the
    # model starts one) would slow every one of them (model.openmp).
    release_openmp_threads()
    thread.start()
    try:
        for candidate in found.found:
            path = candidate.path
            if candidate.probe and (reason := not_decodable(path)) is not None:
                report.skipped[str(path)] = reason
                if on_skip is not None:
                    on_skip()
                continue
            try:
                result = ingest_file(
                    session_factory, data, path, model_id=model.model_id, mode=mode, max_attempts=max_attempts,
                    retry_failed=retry_failed,
                )  # fmt: skip
            except (IngestError, OSError) as e:
                report.failed[str(path)] = str(e)
                result = None
            if result is not None:
                by_video[result.video_id] = path
                if result.job_id is not None:
                    job_ids.append(result.job_id)
                report.already += result.duplicate_of is not None and result.status == "ready"
            if on_skip is not None and (result is None or result.status in ("ready", "failed")):
                on_skip()
    finally:
        hashed.set()
        thread.join()
        worker.close()
    if crashed:
        raise crashed[0]
    settle(session_factory, model.model_id, by_video, report)
    save_snapshot(data, session_factory, model.model_id, feed_retention_s=feed_retention_s)
    report.indexed -= report.already
    report.seconds = time.monotonic() - started
    return report


def settle(
    session_factory: sessionmaker[Session], model_id: str, by_video: Mapping[int, object], report: BulkReport
) -> None:
    """Count each video's outcome into the report (`by_video` maps it to what the user called it)."""
    with session_scope(session_factory) as session:
        for video_id, path in by_video.items():
            video = catalog.get_video(session, video_id)
            segments = len(catalog.segments_for_video(session, video_id, model_id))
            if segments:
                report.indexed += 1
                report.segments += segments
            elif video is None or video.status == "deleted":
                report.failed[str(path)] = "the video was deleted while it was being indexed"
            else:
                report.failed[str(path)] = video.error or f"not indexed (status {video.status})"


# --- a new generation ----------------------------------------------------------------------------
class BulkEngine(Protocol):
    def process(self, tasks: Iterable[VideoTask]) -> None: ...

    def close(self) -> None: ...


EngineFactory = Callable[..., BulkEngine]


def _local_engine(
    session_factory: sessionmaker[Session], data: DataDir, model: TokenBinder, **kwargs: Any
) -> BulkEngine:
    return Worker(session_factory, data, model, require_active=False, **kwargs)


def reindex(
    session_factory: sessionmaker[Session],
    data: DataDir,
    model: TokenBinder,
    *,
    all_videos: bool = False,
    config: PipelineConfig | None = None,
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[TaskResult], None] | None = None,
    engine: EngineFactory | None = None,
    milvus: MilvusIndex | None = None,
    feed_retention_s: float = DEFAULT_RETENTION_S,
) -> BulkReport:
    """Index the library with `model` (videos lacking its segments, or all); then make it the active model.

    A new model's segments and tokens form a generation beside the live one; the switch is one
    transaction, taken only when every video is in the new generation. Re-running resumes.
    `engine` makes what runs the videos (default: a Worker in this process; `indexer.ray_engine` for a
    Ray cluster); it gets (session_factory, data, model, config=, on_result=). With `milvus` (the new
    model's collection) the local worker fills it, and its alias moves to it at the switch.
    """
    started = time.monotonic()
    active = register_model(session_factory, model, require_active=False)
    extra: dict[str, Any] = {"sink": milvus} if milvus is not None else {}
    worker = (engine or _local_engine)(
        session_factory, data, model, config=config, on_result=on_result, **extra
    )
    report = BulkReport()
    seen: dict[int, str] = {}
    try:
        for _ in range(3):  # later passes pick up videos ingested meanwhile
            with session_scope(session_factory) as session:
                todo = _reindex_candidates(session, model.model_id, missing_only=not all_videos or bool(seen))
            todo = [(v, p) for v, p in todo if v not in seen]
            if not todo:
                break
            seen.update((v, p) for v, p in todo)
            if on_start is not None:
                on_start(len(seen))
            worker.process(VideoTask(v, data.resolve(p), None, set_ready=active) for v, p in todo)
    finally:
        worker.close()
    report.files = len(seen)
    settle(session_factory, model.model_id, {v: f"video {v} ({p})" for v, p in seen.items()}, report)
    if not active and not report.failed:
        with session_scope(session_factory) as session:
            if not _reindex_candidates(session, model.model_id, missing_only=True):
                report.switched = catalog.activate_model(session, model.model_id) is not None
    if milvus is None:
        save_snapshot(data, session_factory, model.model_id, feed_retention_s=feed_retention_s)
    elif report.switched:
        milvus.point_alias()  # `<prefix>_active`, for readers outside the service; the catalog switch counts
    report.seconds = time.monotonic() - started
    return report


def _reindex_candidates(session: Session, model_id: str, *, missing_only: bool) -> list[tuple[int, str]]:
    stmt = select(Video.id, Video.stored_path).where(
        Video.status.in_(("pending", "indexing", "ready")), Video.stored_path.is_not(None)
    )
    if missing_only:
        stmt = stmt.where(~exists().where(Segment.video_id == Video.id, Segment.model_id == model_id))
    return [(v, p) for v, p in session.execute(stmt.order_by(Video.id)) if p is not None]
