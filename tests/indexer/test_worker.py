"""The job worker: claiming, failures with and without retry, leases, model checks, several workers at once."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from indexer import jobs
from indexer.catalog import IndexMismatchError, Job, Segment, Video
from indexer.db import make_engine, make_session_factory, session_scope, utcnow
from indexer.ingest import delete_video, ingest_file
from indexer.paths import DataDir
from indexer.pipeline import Encoder, PipelineConfig
from indexer.worker import Worker
from model.checkpoint import load_model, save_checkpoint
from model.tokenbinder import TokenBinder
from synth.generator import write_hostile_files, write_pattern_video


@pytest.fixture(scope="module")
def model() -> TokenBinder:
    return load_model("tiny")


@pytest.fixture
def data(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path / "data").ensure()


@pytest.fixture
def factory(migrated_sqlite_url: str) -> sessionmaker[Session]:
    return make_session_factory(make_engine(migrated_sqlite_url))


def _ingest(factory: sessionmaker[Session], data: DataDir, path: Path, model_id: str) -> tuple[int, int]:
    result = ingest_file(factory, data, path, model_id=model_id, mode="in_place")
    assert result.job_id is not None
    return result.video_id, result.job_id


def _clip(folder: Path, i: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_pattern_video(folder / f"clip{i}.mp4", 1.0 + 0.25 * i, 64, 48, 8, gop=8)


def _wait_until_ready(factory: sessionmaker[Session], video_id: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with session_scope(factory) as session:
            if session.get(Video, video_id).status == "ready":
                return
        time.sleep(0.05)


def _job(factory: sessionmaker[Session], job_id: int) -> Job:
    with session_scope(factory) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None
        return job


class _StateSpy(Encoder):
    """Records the job's (state, progress) as the catalog shows it at each encoder call."""

    def __init__(self, model: TokenBinder, factory: sessionmaker[Session], job_id: int) -> None:
        super().__init__(model)
        self.factory, self.job_id, self.seen = factory, job_id, []

    def encode(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        job = _job(self.factory, self.job_id)
        self.seen.append((job.state, job.progress))
        return super().encode(frames)


def test_run_once_indexes_one_job_through_its_states(
    factory, data, model: TokenBinder, tmp_path: Path
) -> None:
    path = write_pattern_video(tmp_path / "v.mp4", 3.0, 64, 48, 8, gop=8)
    video_id, job_id = _ingest(factory, data, path, model.model_id)
    config = PipelineConfig(max_segment_s=1.0, window_s=1.0, batch_size=1)
    worker = Worker(factory, data, model, config=config)
    worker.encoder = spy = _StateSpy(model, factory, job_id)
    assert worker.run_once() and not worker.run_once()
    worker.close()
    assert spy.seen[0] == ("decoding", 0.0) and spy.seen[-1][0] == "encoding" and 0 < spy.seen[-1][1] < 1
    job = _job(factory, job_id)
    assert (job.state, job.progress, job.attempts, job.lease_owner) == ("ready", 1.0, 1, None)
    with session_scope(factory) as session:
        assert session.get(Video, video_id).status == "ready"
        assert len(session.scalars(select(Segment).where(Segment.video_id == video_id)).all()) == 3


def test_an_undecodable_file_fails_at_once_with_its_reason(factory, data, model, tmp_path: Path) -> None:
    video_id, job_id = _ingest(factory, data, write_hostile_files(tmp_path / "bad")["text"], model.model_id)
    worker = Worker(factory, data, model)
    assert worker.run_once()
    worker.close()
    job = _job(factory, job_id)
    assert (job.state, job.attempts) == ("failed", 1) and "not a video" in job.error
    with session_scope(factory) as session:
        video = session.get(Video, video_id)
        assert video.status == "failed" and video.error == job.error


class _BrokenEncoder(Encoder):
    def encode(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError("CUDA out of memory")


def test_other_errors_go_back_to_the_queue_with_back_off(factory, data, model, tmp_path: Path) -> None:
    video_id, job_id = _ingest(factory, data, _clip(tmp_path, 0), model.model_id)
    worker = Worker(factory, data, model)
    worker.encoder = _BrokenEncoder(model)
    assert worker.run_once()
    assert not worker.run_once(), "the retry waits for its back-off"
    worker.close()
    job = _job(factory, job_id)
    assert (job.state, job.attempts, job.error) == ("queued", 1, "CUDA out of memory")
    assert job.run_after > utcnow()
    assert not data.pending(model.model_id)


class _StolenDuringEncode(Encoder):
    """Simulates the lease expiring mid-job and another worker taking the job over."""

    def __init__(self, model: TokenBinder, factory: sessionmaker[Session], job_id: int) -> None:
        super().__init__(model)
        self.factory, self.job_id = factory, job_id

    def encode(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with session_scope(self.factory) as session:
            session.get(Job, self.job_id).lease_owner = "someone-else:1:x"
        return super().encode(frames)


def test_a_worker_that_lost_its_lease_commits_nothing(factory, data, model, tmp_path: Path) -> None:
    video_id, job_id = _ingest(factory, data, _clip(tmp_path, 0), model.model_id)
    worker = Worker(factory, data, model)
    worker.encoder = _StolenDuringEncode(model, factory, job_id)
    assert worker.run_once()
    worker.close()
    with session_scope(factory) as session:
        assert not session.scalars(select(Segment)).all()
        assert session.get(Video, video_id).status != "ready"
    assert _job(factory, job_id).lease_owner == "someone-else:1:x"
    assert not data.pending(model.model_id), "its token records were freed"


def test_jobs_of_a_dead_worker_on_this_host_resume_at_once(factory, data, model, tmp_path: Path) -> None:
    video_id, job_id = _ingest(factory, data, _clip(tmp_path, 0), model.model_id)
    dead = f"{socket.gethostname()}:999999999:abcdef"  # no such pid
    with session_scope(factory) as session:
        assert jobs.claim_next(session, dead, lease_s=3600).id == job_id
    worker = Worker(factory, data, model)
    assert worker.run_once()
    worker.close()
    assert (_job(factory, job_id).state, _job(factory, job_id).attempts) == ("ready", 2)


def test_a_worker_with_another_model_is_refused(factory, data, model, tmp_path: Path) -> None:
    _ingest(factory, data, _clip(tmp_path, 0), model.model_id)
    first = Worker(factory, data, model)
    assert first.run_once()
    first.close()
    other = load_model(str(save_checkpoint(model, tmp_path / "ckpt")))
    assert other.model_id != model.model_id
    with pytest.raises(IndexMismatchError, match="indexer reindex --model"):
        Worker(factory, data, other).run_once()


def test_workers_racing_index_each_video_exactly_once(
    migrated_db_url: str, data, model, tmp_path: Path
) -> None:
    engine = make_engine(migrated_db_url)
    factory = make_session_factory(engine)
    job_ids = [_ingest(factory, data, _clip(tmp_path / "lib", i), model.model_id)[1] for i in range(6)]

    def idle() -> bool:
        with session_scope(factory) as session:
            return not session.scalar(
                select(func.count()).where(Job.state.in_(("queued", *jobs.ACTIVE_STATES)))
            )

    workers = [Worker(factory, data, model, worker_id=f"w{i}", poll_s=0.05) for i in range(2)]
    threads = [threading.Thread(target=w.run, kwargs={"until": idle}) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for w in workers:
        w.close()
    with session_scope(factory) as session:
        states = session.execute(select(Job.state, Job.attempts).where(Job.id.in_(job_ids))).all()
        per_video = session.execute(select(Segment.video_id, func.count()).group_by(Segment.video_id)).all()
        statuses = set(session.scalars(select(Video.status)))
    engine.dispose()
    assert sorted(states) == [("ready", 1)] * 6, "every job ran once, by one worker"
    assert sorted(n for _, n in per_video) == [1] * 6 and statuses == {"ready"}


def test_start_thread_follows_the_queue_until_stopped(factory, data, model, tmp_path: Path) -> None:
    worker = Worker(factory, data, model, poll_s=0.05)
    thread = worker.start_thread()
    video_id, _ = _ingest(factory, data, _clip(tmp_path, 0), model.model_id)
    _wait_until_ready(factory, video_id)
    worker.stop(timeout=timedelta(seconds=30).total_seconds())
    assert not thread.is_alive()
    with session_scope(factory) as session:
        assert session.get(Video, video_id).status == "ready"


def test_an_idle_worker_gives_back_its_openmp_pool(
    factory, data, model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its encoder thread's pool, left alive, would slow the search thread's (model.openmp).
    from indexer import pipeline

    events: list[tuple[str, str]] = []
    encode = pipeline.Encoder.encode

    def recording_encode(self: Encoder, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        events.append(("encode", threading.current_thread().name))
        return encode(self, frames)

    monkeypatch.setattr(pipeline, "_IDLE_RELEASE_S", 0.2)
    monkeypatch.setattr(pipeline.Encoder, "encode", recording_encode)
    monkeypatch.setattr(
        pipeline,
        "release_openmp_threads",
        lambda: events.append(("release", threading.current_thread().name)),
    )
    worker = Worker(factory, data, model, poll_s=0.05)
    thread = worker.start_thread()
    try:
        video_id, _ = _ingest(factory, data, _clip(tmp_path, 0), model.model_id)
        _wait_until_ready(factory, video_id)
        time.sleep(1.0)
    finally:
        worker.stop(timeout=30)
    assert ("encode", thread.name) in events
    assert events[-1] == ("release", thread.name), "idle after its last batch: the pool was not given back"


class _DeletedDuringEncode(Encoder):
    def __init__(
        self, model: TokenBinder, factory: sessionmaker[Session], data: DataDir, video_id: int
    ) -> None:
        super().__init__(model)
        self.factory, self.data, self.video_id = factory, data, video_id

    def encode(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        delete_video(self.factory, self.data, self.video_id)
        return super().encode(frames)


def test_a_video_deleted_while_it_is_indexed_stays_deleted(factory, data, model, tmp_path: Path) -> None:
    video_id, job_id = _ingest(factory, data, _clip(tmp_path, 0), model.model_id)
    worker = Worker(factory, data, model)
    worker.encoder = _DeletedDuringEncode(model, factory, data, video_id)
    assert worker.run_once()
    worker.close()
    job = _job(factory, job_id)
    assert job.state == "failed" and "deleted" in job.error
    with session_scope(factory) as session:
        assert session.get(Video, video_id).status == "deleted" and not session.scalars(select(Segment)).all()
    assert not data.pending(model.model_id)
