"""`indexer watch`: index videos as they appear in folders, re-index changed ones, remove deleted ones."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from indexer.catalog import Video, register_model
from indexer.db import session_scope
from indexer.failures import failure_reason, skip_reason
from indexer.feed_compaction import DEFAULT_RETENTION_S
from indexer.ingest import Found, IngestError, classify, delete_video, ingest_file
from indexer.live_index import save_snapshot
from indexer.paths import DataDir
from indexer.pipeline import PipelineConfig, TaskResult
from indexer.worker import Worker
from model import video
from model.openmp import release_openmp_threads
from model.tokenbinder import TokenBinder
from model.video import VideoDecodeError

logger = logging.getLogger(__name__)

Say = Callable[[str], None]


@dataclass
class _Pending:
    """A file that changed and has not been quiet for `settle_s` yet (it may still be being copied)."""

    size: int
    mtime_ns: int
    since: float


@dataclass
class Watcher:
    """Turns file-system events under `folders` into ingests and deletes; one line per event via `say`."""

    factory: sessionmaker[Session]
    data: DataDir
    model_id: str
    say: Say
    settle_s: float = 2.0
    pending: dict[Path, _Pending] = field(default_factory=dict)
    videos: dict[int, Path] = field(default_factory=dict)  # video id -> file, for the job's outcome line

    def changed(self, path: Path) -> None:
        try:
            st = path.stat()
        except OSError:
            self.removed(path)
            return
        self.pending[path] = _Pending(st.st_size, st.st_mtime_ns, time.monotonic())

    def removed(self, path: Path) -> None:
        self.pending.pop(path, None)
        for video_id in self._videos_at(path):
            delete_video(self.factory, self.data, video_id)
            self.say(f"removed {path} (video {video_id})")

    def settle(self) -> None:
        """Ingest every pending file that has not changed for settle_s (size and mtime both still)."""
        now = time.monotonic()
        for path, seen in list(self.pending.items()):
            try:
                st = path.stat()
            except OSError:
                self.removed(path)
                continue
            if (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns):
                self.pending[path] = _Pending(st.st_size, st.st_mtime_ns, now)
            elif now - seen.since >= self.settle_s:
                del self.pending[path]
                self._ingest(path)

    def _ingest(self, path: Path) -> None:
        verdict = classify(path)
        if isinstance(verdict, str):
            self.say(f"skipped {path}: {verdict}")
            return
        if reason := _not_a_video(verdict):
            self.say(f"skipped {path}: {reason}")
            return
        before = self._videos_at(path)
        try:
            result = ingest_file(self.factory, self.data, path, model_id=self.model_id, mode="in_place",
                                 retry_failed=True)  # fmt: skip
        except (IngestError, OSError) as e:
            self.say(f"failed {path}: {failure_reason(e)}")
            return
        for old in before - {result.video_id}:  # the file's earlier contents
            delete_video(self.factory, self.data, old)
            self.say(f"removed {path} (video {old}, replaced by its new contents)")
        if result.duplicate_of is not None:
            self.say(f"unchanged {path} (video {result.video_id}, {result.status})")
            return
        self.videos[result.video_id] = path
        self.say(f"queued {path} (video {result.video_id}, job {result.job_id})")

    def outcome(self, result: TaskResult) -> None:
        path = self.videos.get(result.task.video_id)
        if path is None:
            return  # a job of another client (the API); its own caller reports it
        if result.ok:
            self.videos.pop(result.task.video_id, None)
            self.say(f"indexed {path} (video {result.task.video_id}, {len(result.segment_ids)} segments)")
        elif not result.retryable:
            self.videos.pop(result.task.video_id, None)
            self.say(f"failed {path}: {failure_reason(result.error) if result.error else 'unknown error'}")

    def _videos_at(self, path: Path) -> set[int]:
        with session_scope(self.factory) as session:
            rows = session.scalars(
                select(Video.id).where(Video.stored_path == str(path), Video.status != "deleted")
            )
            return set(rows)


def _not_a_video(found: Found) -> str | None:
    if not found.probe:
        return None
    try:
        video.probe(found.path)
    except VideoDecodeError as e:
        return skip_reason(e)
    return None


def watch(
    factory: sessionmaker[Session],
    data: DataDir,
    model: TokenBinder,
    folders: Sequence[Path],
    stop: threading.Event,
    say: Say,
    *,
    settle_s: float = 2.0,
    debounce_ms: int = 500,
    config: PipelineConfig | None = None,
    feed_retention_s: float = DEFAULT_RETENTION_S,
) -> None:
    """Run until `stop` is set: index files that appear or change under `folders` once they have been quiet
    for `settle_s`, and delete the videos of files that disappear. Jobs run in a worker thread."""
    roots = [folder.expanduser().resolve() for folder in folders]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a folder; `indexer watch` takes folders to watch")
    register_model(factory, model, require_active=True)
    watcher = Watcher(factory, data, model.model_id, say, settle_s)
    worker = Worker(factory, data, model, poll_s=0.2, config=config, on_result=watcher.outcome)
    release_openmp_threads()  # the model's encodes run in the worker thread (model.openmp)
    thread = worker.start_thread()
    say(f"watching {', '.join(map(str, roots))} (Ctrl-C stops)")
    try:
        step_ms = max(50, min(debounce_ms, int(settle_s * 500)))
        for changes in watchfiles.watch(
            *roots, debounce=debounce_ms, step=50, stop_event=stop, rust_timeout=step_ms,
            yield_on_timeout=True, raise_interrupt=False,
        ):  # fmt: skip
            for change, name in sorted(changes, key=lambda c: c[1]):
                path = Path(name)
                if any(part.startswith(".") for part in path.relative_to(_root_of(path, roots)).parts):
                    continue  # hidden files and folders: partial downloads, editor droppings
                if change == watchfiles.Change.deleted:
                    watcher.removed(path)
                elif os.path.isfile(path):
                    watcher.changed(path)
            watcher.settle()
    finally:
        worker.stop()
        worker.close()
        thread.join(timeout=30)
        save_snapshot(data, factory, model.model_id, feed_retention_s=feed_retention_s)
        say("stopped")


def _root_of(path: Path, roots: Sequence[Path]) -> Path:
    return next((root for root in roots if path.is_relative_to(root)), path.parent)
