"""Pipeline stages alone (reader, encoder, writer) and wired together."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from indexer.catalog import Change, Segment, Video, ensure_model
from indexer.db import make_engine, make_session_factory, session_scope
from indexer.ingest import ingest_file
from indexer.paths import DataDir
from indexer.pipeline import (
    EncodedSegment,
    Encoder,
    PipelineConfig,
    TaskCancelledError,
    TaskResult,
    VideoTask,
    Writer,
    read_video,
    run_pipeline,
)
from indexer.token_store import TokenStore
from model.checkpoint import load_model
from model.tokenbinder import TokenBinder
from model.video import VideoDecodeError
from synth.generator import write_hostile_files, write_pattern_video

T, D = 4, 32  # the tiny preset


@pytest.fixture(scope="module")
def model() -> TokenBinder:
    return load_model("tiny")


@pytest.fixture
def env(migrated_sqlite_url: str, tmp_path: Path, model: TokenBinder):
    data = DataDir(tmp_path / "data").ensure()
    factory = make_session_factory(make_engine(migrated_sqlite_url))
    with session_scope(factory) as session:
        ensure_model(session, model.model_id, "tiny", D, T)
    store = TokenStore(data.tokens_dir(model.model_id), T, D)
    yield data, factory, store
    store.close()


def _video(factory: sessionmaker[Session], data: DataDir, path: Path, model_id: str) -> VideoTask:
    result = ingest_file(factory, data, path, model_id=model_id, mode="in_place")
    return VideoTask(result.video_id, path, result.job_id)


def _encoded(n: int, seed: int) -> list[EncodedSegment]:
    rng = np.random.default_rng(seed)
    thumb = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    return [
        EncodedSegment(i, 2.0 * i, 2.0 * i + 2, rng.standard_normal((T, D)), rng.standard_normal(D), thumb)
        for i in range(n)
    ]


def test_reader_cuts_windows_and_streams_sampled_frames(tmp_path: Path) -> None:
    path = write_pattern_video(tmp_path / "v.mp4", 5.0, 96, 64, 8, gop=8)
    config = PipelineConfig(max_segment_s=4.0, window_s=2.0, thumb_max_side=40)
    info, windows, frames = read_video(path, T, 32, config)
    assert info.duration_s == pytest.approx(5.0, abs=0.2) and (info.width, info.height) == (96, 64)
    assert windows == [(0.0, 2.0), (2.0, 4.0), (4.0, pytest.approx(info.duration_s))]
    segs = list(frames)
    assert [s.index for s in segs] == [0, 1, 2]
    assert all(s.frames.shape == (T, 32, 32, 3) and s.frames.dtype == np.uint8 for s in segs)
    assert all(max(s.thumbnail.shape[:2]) <= 40 for s in segs)
    with pytest.raises(VideoDecodeError):
        read_video(write_hostile_files(tmp_path / "bad")["text"], T, 32, config)


def test_encoder_matches_the_model(model: TokenBinder) -> None:
    frames = np.random.default_rng(0).integers(0, 255, (3, T, 32, 32, 3), dtype=np.uint8)
    tokens, cls = Encoder(model).encode(frames)
    assert tokens.shape == (3, T, D) and cls.shape == (3, D) and tokens.dtype == np.float32
    with torch.no_grad():
        ref = model.encode_frames(model.preprocess_frames(frames))
    np.testing.assert_allclose(cls, ref.cls.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(cls, axis=1), 1.0, atol=1e-5)
    chunked_tokens, chunked_cls = Encoder(model, max_frames=T).encode(frames)  # one segment per forward
    np.testing.assert_allclose(chunked_tokens, tokens, atol=1e-5)
    np.testing.assert_allclose(chunked_cls, cls, atol=1e-5)


def test_writer_makes_tokens_durable_then_commits_once(env, model: TokenBinder, tmp_path: Path) -> None:
    data, factory, store = env
    task = _video(factory, data, write_pattern_video(tmp_path / "a.mp4", 1.0, 64, 48, 8), model.model_id)
    info = read_video(task.path, T, 32, PipelineConfig())[0]
    segs = _encoded(3, seed=1)
    ids = Writer(factory, data, model.model_id, store).commit(task, info, segs)
    np.testing.assert_allclose(store.get_tokens(ids), np.stack([s.tokens for s in segs]), atol=2e-3)
    with session_scope(factory) as session:
        rows = session.scalars(
            select(Segment).where(Segment.video_id == task.video_id).order_by(Segment.ordinal)
        )
        assert [(r.id, r.start_s, r.end_s) for r in rows] == [
            (i, 2.0 * n, 2.0 * n + 2) for n, i in enumerate(ids)
        ]
        video = session.get(Video, task.video_id)
        assert video.status == "ready" and video.duration_s == pytest.approx(info.duration_s)
        assert [c.segment_id for c in session.scalars(select(Change).where(Change.op == "add"))] == ids
    with Image.open(data.root / data.thumb_relpath(task.video_id, 2)) as thumb:
        assert (thumb.format, thumb.size) == ("JPEG", (32, 24))
    assert not data.pending(model.model_id), "the journal is cleared after the commit"

    # Committing the video again replaces its segments: the old ones leave the feed and the store.
    new_ids = Writer(factory, data, model.model_id, store).commit(task, info, _encoded(2, seed=2))
    assert not set(new_ids) & set(ids) and not store.has(ids).any()
    with session_scope(factory) as session:
        assert sorted(session.scalars(select(Segment.id))) == new_ids
        assert sorted(session.scalars(select(Change.segment_id).where(Change.op == "delete"))) == ids


def test_a_crash_between_tokens_and_catalog_leaves_nothing_behind(
    env, model: TokenBinder, tmp_path: Path
) -> None:
    data, factory, store = env
    task = _video(factory, data, write_pattern_video(tmp_path / "a.mp4", 1.0, 64, 48, 8), model.model_id)
    info = read_video(task.path, T, 32, PipelineConfig())[0]

    def crash(session: Session, task: VideoTask) -> None:
        raise RuntimeError("killed between the token flush and the catalog commit")

    with pytest.raises(RuntimeError, match="killed"):
        Writer(factory, data, model.model_id, store, on_commit=crash).commit(task, info, _encoded(2, seed=3))
    orphans = data.pending(model.model_id)[task.video_id]
    assert store.has(orphans).all(), "tokens were durable before the commit"
    with session_scope(factory) as session:
        assert (
            not session.scalars(select(Segment)).all()
            and session.get(Video, task.video_id).status == "pending"
        )

    # The job's next attempt frees what the crashed one wrote, and commits its own.
    ids = Writer(factory, data, model.model_id, store).commit(task, info, _encoded(2, seed=4))
    assert not store.has(orphans).any() and store.has(ids).all()
    assert not data.pending(model.model_id)


class _FlakyEncoder(Encoder):
    def __init__(self, model: TokenBinder, fail_calls: set[int]) -> None:
        super().__init__(model)
        self.calls, self.fail_calls = 0, fail_calls

    def encode(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        if self.calls in self.fail_calls:
            raise RuntimeError("out of memory")
        return super().encode(frames)


def test_wired_pipeline_isolates_bad_videos_and_failed_batches(
    env, model: TokenBinder, tmp_path: Path
) -> None:
    data, factory, store = env
    good = [write_pattern_video(tmp_path / f"g{i}.mp4", 1.0 + 0.5 * i, 64, 48, 8, gop=8) for i in range(3)]
    long = write_pattern_video(tmp_path / "long.mp4", 5.0, 64, 48, 8, gop=8)
    bad = write_hostile_files(tmp_path / "bad")["truncated"]
    tasks = [_video(factory, data, p, model.model_id) for p in [good[0], bad, long, *good[1:]]]
    results: list[TaskResult] = []
    encoder = _FlakyEncoder(model, fail_calls={1})
    config = PipelineConfig(max_segment_s=4.0, window_s=2.0, batch_size=2, decode_threads=2)
    writer = Writer(factory, data, model.model_id, store)
    run_pipeline(
        tasks, num_frames=T, size=32, encoder=encoder, writer=writer, on_result=results.append, config=config
    )

    by_task = {r.task: r for r in results}
    assert len(results) == len(tasks) == len(by_task), "exactly one result per video"
    bad_result = by_task[tasks[1]]
    assert isinstance(bad_result.error, VideoDecodeError) and not bad_result.retryable
    flaky = [r for r in results if isinstance(r.error, RuntimeError)]
    assert flaky and all(r.retryable for r in flaky), "a failed batch fails its videos, retryably"
    ok = [r for r in results if r.ok]
    assert len(ok) + len(flaky) + 1 == len(tasks)
    with session_scope(factory) as session:
        for r in ok:
            rows = session.scalars(select(Segment.id).where(Segment.video_id == r.task.video_id)).all()
            assert sorted(rows) == sorted(r.segment_ids) and store.has(rows).all()
    long_result = by_task[tasks[2]]
    assert not long_result.ok or len(long_result.segment_ids) == 3


def test_stop_ends_an_endless_task_source(env, model: TokenBinder, tmp_path: Path) -> None:
    data, factory, store = env
    path = write_pattern_video(tmp_path / "a.mp4", 1.0, 64, 48, 8, gop=8)
    task = _video(factory, data, path, model.model_id)
    stop, results = threading.Event(), []

    def endless():
        while True:
            yield VideoTask(task.video_id, path)

    def on_result(result: TaskResult) -> None:
        results.append(result)
        stop.set()

    writer = Writer(factory, data, model.model_id, store)
    run_pipeline(
        endless(),
        num_frames=T,
        size=32,
        encoder=Encoder(model),
        writer=writer,
        on_result=on_result,
        stop=stop,
    )
    assert results and all(r.ok for r in results)


def test_a_cancelled_task_stops_between_stages_and_commits_nothing(
    env, model: TokenBinder, tmp_path: Path
) -> None:
    """Cancelled after its first segment: dropped at the next boundary, no segment rows, no tokens kept."""
    data, factory, store = env
    long = write_pattern_video(tmp_path / "long.mp4", 5.0, 64, 48, 8, gop=8)
    short = write_pattern_video(tmp_path / "short.mp4", 1.0, 64, 48, 8, gop=8)
    doomed, kept = _video(factory, data, long, model.model_id), _video(factory, data, short, model.model_id)
    progressed: set[VideoTask] = set()
    results: list[TaskResult] = []
    config = PipelineConfig(max_segment_s=2.0, window_s=1.0, batch_size=1)
    run_pipeline(
        [doomed, kept],
        num_frames=T,
        size=32,
        encoder=Encoder(model),
        writer=Writer(factory, data, model.model_id, store),
        on_result=results.append,
        on_progress=lambda task, state, fraction: progressed.add(task),
        config=config,
        cancelled=lambda task: task is doomed and doomed in progressed,
    )
    by_task = {r.task: r for r in results}
    assert isinstance(by_task[doomed].error, TaskCancelledError) and not by_task[doomed].retryable
    assert by_task[kept].ok and by_task[kept].segment_ids
    with session_scope(factory) as session:
        assert session.scalars(select(Segment.id).where(Segment.video_id == doomed.video_id)).all() == []
    assert data.pending(model.model_id).get(doomed.video_id) is None
