"""Ingestion stages: reader (decode + segment) -> encoder (batched forward) -> writer (tokens, then catalog).

A little over 400 lines: the three stages and the function that wires them, as clip-retrieval keeps them;
each stage is tested alone (tests/indexer/test_pipeline.py).
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog
from indexer.catalog import NewSegment, VideoNotAvailableError
from indexer.db import session_scope, utcnow
from indexer.errors import IndexerError
from indexer.ingest import delete_segments, release_pending
from indexer.milvus_schema import SegmentRow
from indexer.paths import DataDir
from indexer.token_store import TokenStore
from model import video
from model.openmp import release_openmp_threads
from model.tokenbinder import TokenBinder
from model.video import SegmentFrames, VideoDecodeError, VideoInfo

logger = logging.getLogger(__name__)


class NoFramesError(IndexerError):
    """A video probed fine but gave no decodable frames."""


class TaskCancelledError(IndexerError):
    """The task's job was cancelled; the pipeline dropped it between stages and committed nothing."""


@dataclass(frozen=True)
class PipelineConfig:
    max_segment_s: float = 30.0  # a video up to this long is one segment
    window_s: float = 15.0  # longer ones are cut into windows of this length
    batch_size: int = 8  # segments per encoder forward (T frames each)
    decode_threads: int = 1
    queue_segments: int = 16  # decoded segments waiting for the encoder: bounds memory
    videos_ahead: int = 3  # videos taken (jobs claimed) but not yet written: leaves jobs to other workers
    thumb_max_side: int = 320
    jpeg_quality: int = 85


@dataclass(frozen=True, eq=False)  # identity semantics: one object per claimed job
class VideoTask:
    video_id: int
    path: Path
    job_id: int | None = None
    set_ready: bool = True  # False for a model that is not active: the video's status follows the active one


@dataclass(frozen=True)
class EncodedSegment:
    ordinal: int
    start_s: float
    end_s: float
    tokens: np.ndarray  # [T, D] float32
    cls: np.ndarray  # [D] float32
    thumbnail: np.ndarray  # [h, w, 3] uint8


@dataclass
class TaskResult:
    task: VideoTask
    info: VideoInfo | None = None
    segment_ids: list[int] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def retryable(self) -> bool:
        # A file that cannot be decoded, or a video deleted meanwhile, will not get better by retrying.
        return not isinstance(
            self.error, (VideoDecodeError, NoFramesError, VideoNotAvailableError, TaskCancelledError)
        )


# --- reader ---------------------------------------------------------------------------------------------
def read_video(
    path: Path, num_frames: int, size: int, config: PipelineConfig
) -> tuple[VideoInfo, list[tuple[float, float]], Iterator[SegmentFrames]]:
    """Probe (raises VideoDecodeError), cut into windows, and stream each window's sampled frames."""
    info = video.probe(path)
    windows = video.segment_windows(info.duration_s, config.max_segment_s, config.window_s)
    frames = video.iter_segment_frames(path, windows, num_frames, size, thumb_max_side=config.thumb_max_side)
    return info, windows, frames


# --- encoder --------------------------------------------------------------------------------------------
class Encoder:
    """Frames -> frame tokens and CLS through the model's image tower, without autograd.

    A batch is run in chunks of at most `max_frames` frames: the activations of a whole batch of
    long-video segments would otherwise dominate the indexer's memory.
    """

    def __init__(self, model: TokenBinder, max_frames: int = 32) -> None:
        self.model = model.eval()
        self.max_frames = max_frames

    def encode(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, T, S, S, 3] -> (tokens [N, T, D], cls [N, D]) float32 numpy."""
        step = max(1, self.max_frames // max(1, frames.shape[1]))
        tokens, cls = [], []
        with torch.inference_mode():
            for start in range(0, len(frames), step):
                out = self.model.encode_frames(self.model.preprocess_frames(frames[start : start + step]))
                tokens.append(out.frame_tokens.float().cpu().numpy())
                cls.append(out.cls.float().cpu().numpy())
        return np.concatenate(tokens), np.concatenate(cls)


# --- writer ---------------------------------------------------------------------------------------------
@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive flock, between processes and between threads (each open() is its own lock holder)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save_thumbnail(path: Path, rgb: np.ndarray, quality: int = 85) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, path)  # whoever serves the thumbnail never sees half a file


CommitHook = Callable[[Session, VideoTask], None]


class VectorSink(Protocol):
    """A vector database the writer keeps in step with the catalog (indexer.milvus_index.MilvusIndex)."""

    def add(self, rows: Sequence[SegmentRow], cls: np.ndarray, tokens: np.ndarray) -> frozenset[str]: ...

    def complete_add(
        self, rows: Sequence[SegmentRow], cls: np.ndarray, tokens: np.ndarray, written: frozenset[str]
    ) -> frozenset[str]: ...

    def delete(self, ids: Iterable[int]) -> None: ...


class Writer:
    """Thumbnails; tokens made durable; then ONE catalog transaction that makes the video searchable.

    `on_commit` runs inside that transaction: the worker completes its job there, so the segments and
    the job's `ready` commit together or not at all.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        data: DataDir,
        model_id: str,
        store: TokenStore,
        *,
        on_commit: CommitHook | None = None,
        jpeg_quality: int = 85,
        sink: VectorSink | None = None,
    ) -> None:
        self._factory, self.data, self.model_id, self.store = session_factory, data, model_id, store
        self._on_commit, self._quality, self.sink = on_commit, jpeg_quality, sink

    def commit(self, task: VideoTask, info: VideoInfo, segments: Sequence[EncodedSegment]) -> list[int]:
        if not segments:
            raise NoFramesError(f"{task.path}: no window of the video gave decodable frames")
        segments = sorted(segments, key=lambda s: s.ordinal)
        vid, data = task.video_id, self.data
        for seg in segments:
            save_thumbnail(data.root / data.thumb_relpath(vid, seg.ordinal), seg.thumbnail, self._quality)
        self.discard(task)  # what a crashed earlier attempt wrote but never committed
        with self._factory() as session:
            ids = catalog.allocate_segment_ids(session, len(segments))
            session.commit()
        data.write_pending(self.model_id, vid, ids)
        tokens, cls = np.stack([s.tokens for s in segments]), np.stack([s.cls for s in segments])
        with _exclusive(data.tokens_dir(self.model_id) / ".writer.lock"):
            # Serialised across workers: two stores creating the same new shard file at once
            # would replace each other's file (and lose records).
            self.store.put_many(ids, tokens, cls)
        self.store.flush()  # tokens durable before the rows that make them searchable
        written: frozenset[str] = frozenset()
        if self.sink is not None:
            # Before the catalog commit: the searcher drops hits the catalog does not have, so a crash
            # here leaves stray rows that nothing returns (verify --repair removes them).
            with self._factory() as session:
                video_row = catalog.get_video(session, vid)
                created = video_row.created_at if video_row is not None else utcnow()
            rows_out = [
                SegmentRow(i, vid, s.start_s, s.end_s, created, info.duration_s)
                for i, s in zip(ids, segments, strict=True)
            ]
            written = self.sink.add(rows_out, cls, tokens)
        rows = [
            NewSegment(i, s.ordinal, s.start_s, s.end_s, data.thumb_relpath(vid, s.ordinal))
            for i, s in zip(ids, segments, strict=True)
        ]
        with session_scope(self._factory) as session:
            replaced = delete_segments(session, vid, self.model_id)
            catalog.add_segments(session, vid, self.model_id, rows)
            video = catalog.get_video(session, vid)
            assert video is not None  # add_segments refused a missing video
            for key in ("duration_s", "fps", "width", "height"):
                setattr(video, key, getattr(info, key))
            if task.set_ready:
                video.status, video.error = "ready", None
            if self._on_commit is not None:
                self._on_commit(session, task)
        if self.sink is not None:
            # A rebuild that began between the write and the commit fills a generation the write missed:
            # the sink copies the rows there now (after the commit, so the rebuild's own comparison
            # either saw them committed or is followed by this).
            try:
                self.sink.complete_add(rows_out, cls, tokens, written)
            except Exception as e:  # committed and searchable: only a rebuild's new generation may lack them
                logger.warning(
                    "video %s committed, but its rows may be missing from a Milvus generation being rebuilt "
                    "(%s); run `indexer verify --backend milvus --repair` after the rebuild",
                    vid, e,
                )  # fmt: skip
        if replaced:
            self.store.free(replaced)
            self.store.flush()
            if self.sink is not None:
                self.sink.delete(replaced)
        data.clear_pending(self.model_id, vid)
        return ids

    def discard(self, task: VideoTask) -> None:
        """Free records written for this video that never reached the catalog."""
        orphans = release_pending(self._factory, self.data, self.model_id, task.video_id, self.store)
        if orphans and self.sink is not None:
            self.sink.delete(orphans)


# --- wiring ---------------------------------------------------------------------------------------------
ProgressHook = Callable[[VideoTask, str, float], None]
CancelledHook = Callable[[VideoTask], bool]
_DONE = "done"
_IDLE_RELEASE_S = 1.0  # the encoder thread gives back its OpenMP pool after this long without work


def run_pipeline(
    tasks: Iterable[VideoTask],
    *,
    num_frames: int,
    size: int,
    encoder: Encoder,
    writer: Writer,
    on_result: Callable[[TaskResult], None],
    on_progress: ProgressHook | None = None,
    config: PipelineConfig | None = None,
    stop: threading.Event | None = None,
    cancelled: CancelledHook | None = None,
) -> None:
    """Decode in `config.decode_threads` threads, encode batches in this thread, write in another thread.

    Decoding the next segments (and videos) overlaps encoding, and batches span videos. `tasks` is
    pulled lazily (a worker claims a job only when a reader is free). Setting `stop` stops taking new
    tasks; tasks already started finish. A task for which `cancelled(task)` turns true is dropped at the
    next stage boundary (before decoding, between segments, before writing) with TaskCancelledError.
    """
    is_cancelled = cancelled or (lambda task: False)
    cfg = config or PipelineConfig()
    stop = stop or threading.Event()
    decoded: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=cfg.queue_segments)
    encoded: queue.Queue[tuple[Any, ...]] = queue.Queue()
    source, source_lock = iter(tasks), threading.Lock()
    ahead = threading.Semaphore(max(cfg.videos_ahead, cfg.decode_threads))

    def read() -> None:
        try:
            while not stop.is_set():
                if not ahead.acquire(timeout=0.1):
                    continue
                with source_lock:
                    task = next(source, None)
                if task is None:
                    return
                try:
                    if is_cancelled(task):
                        raise TaskCancelledError(f"job {task.job_id} was cancelled before decoding")
                    info, windows, frames = read_video(task.path, num_frames, size, cfg)
                    decoded.put(("begin", task, info, len(windows)))
                    for seg in frames:
                        if is_cancelled(task):
                            raise TaskCancelledError(f"job {task.job_id} was cancelled while decoding")
                        decoded.put(("seg", task, seg))
                    decoded.put(("end", task))
                except Exception as e:  # this video's failure; the others go on
                    decoded.put(("error", task, e))
        except BaseException as e:  # the task source itself failed (e.g. the database went away)
            decoded.put(("fatal", None, e))
        finally:
            decoded.put((_DONE, None))

    readers = [
        threading.Thread(target=read, name=f"reader-{i}", daemon=True) for i in range(cfg.decode_threads)
    ]

    def deliver(result: TaskResult) -> None:
        ahead.release()
        on_result(result)

    writer_thread = threading.Thread(
        target=_write_loop, args=(encoded, writer, deliver, is_cancelled), name="writer"
    )
    writer_thread.daemon = True
    for thread in (*readers, writer_thread):
        thread.start()
    try:
        fatal = _encode_loop(decoded, encoded, encoder, cfg, len(readers), on_progress, stop)
    finally:
        encoded.put((_DONE, None))
        writer_thread.join()
    if fatal is not None:
        raise fatal


def _encode_loop(
    decoded: queue.Queue[tuple[Any, ...]],
    encoded: queue.Queue[tuple[Any, ...]],
    encoder: Encoder,
    cfg: PipelineConfig,
    readers: int,
    on_progress: ProgressHook | None,
    stop: threading.Event,
) -> BaseException | None:
    windows: dict[VideoTask, list[int]] = {}  # task -> [windows, encoded]
    failed: set[VideoTask] = set()
    fatal: BaseException | None = None
    while readers:
        # Block for one item, then take whatever else is ready, up to a full batch of segments.
        try:
            batch = [decoded.get(timeout=_IDLE_RELEASE_S)]
        except queue.Empty:
            # Nothing to encode for a while (no jobs): give back this thread's OpenMP pool, which would
            # otherwise slow every parallel op of the service's search thread (model.openmp).
            release_openmp_threads()
            batch = [decoded.get()]
        while sum(b[0] == "seg" for b in batch) < cfg.batch_size:
            try:
                batch.append(decoded.get_nowait())
            except queue.Empty:
                break
        segs = [b for b in batch if b[0] == "seg" and b[1] not in failed]
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if segs:
            try:
                tokens, cls = encoder.encode(np.stack([b[2].frames for b in segs]))
                out = {id(b): (tokens[i], cls[i]) for i, b in enumerate(segs)}
            except Exception as e:
                for task in dict.fromkeys(b[1] for b in segs if b[1] not in failed):
                    failed.add(task)
                    encoded.put(("error", task, e))
        for item in batch:
            kind, task = item[0], item[1]
            if kind == _DONE:
                readers -= 1
            elif kind == "fatal":
                fatal = item[2]
                stop.set()
            elif task in failed:
                if kind in ("end", "error"):  # the reader is through with it
                    failed.discard(task)
                    windows.pop(task, None)
            elif kind == "seg":
                seg: SegmentFrames = item[2]
                tok, vec = out[id(item)]
                # A copy: the decoder's array can pin a frame buffer of the decoder until the video ends.
                thumb = np.array(seg.thumbnail, copy=True)
                encoded.put(("seg", task, EncodedSegment(seg.index, seg.start, seg.end, tok, vec, thumb)))
                counts = windows[task]
                counts[1] += 1
                if on_progress is not None:
                    on_progress(task, "encoding", min(1.0, counts[1] / max(1, counts[0])))
            else:
                if kind == "begin":
                    windows[task] = [item[3], 0]
                else:
                    windows.pop(task, None)
                encoded.put(item)
    return fatal


def _write_loop(
    encoded: queue.Queue[tuple[Any, ...]],
    writer: Writer,
    on_result: Callable[[TaskResult], None],
    cancelled: CancelledHook,
) -> None:
    pending: dict[VideoTask, tuple[VideoInfo, list[EncodedSegment]]] = {}
    while (item := encoded.get())[0] != _DONE:
        kind, task = item[0], item[1]
        result: TaskResult | None = None
        if kind == "begin":
            pending[task] = (item[2], [])
        elif kind == "seg" and task in pending:
            pending[task][1].append(item[2])
        elif kind == "error":
            pending.pop(task, None)
            result = TaskResult(task, error=item[2])
        elif kind == "end" and task in pending:
            info, segs = pending.pop(task)
            try:
                if cancelled(task):
                    raise TaskCancelledError(
                        f"job {task.job_id} was cancelled before its segments were written"
                    )
                result = TaskResult(task, info, writer.commit(task, info, segs))
            except Exception as e:
                result = TaskResult(task, info, error=e)
                _safely(writer.discard, task)
        if result is not None:
            _safely(on_result, result)


def _safely(fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except Exception:
        # A failing callback must not stop the stage thread: the other videos still need it.
        logger.exception("%s failed", getattr(fn, "__qualname__", fn))
