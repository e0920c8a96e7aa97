"""The job queue: claiming under leases, lease expiry, retries with back-off, and racing workers."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from indexer import jobs
from indexer.db import session_scope, utcnow

MODEL = "ViT-B-32@abc123"


def enqueue_n(factory: sessionmaker[Session], n: int, max_attempts: int = 3) -> list[int]:
    with session_scope(factory) as session:
        return [jobs.enqueue(session, "ingest", None, MODEL, max_attempts=max_attempts).id for _ in range(n)]


def claim(factory: sessionmaker[Session], worker: str, now=None, lease_s: float = 60):
    with session_scope(factory) as session:
        job = jobs.claim_next(session, worker, lease_s, now=now)
        return None if job is None else (job.id, job.state, job.attempts, job.lease_owner)


def test_claim_takes_oldest_first_and_complete_finishes(session_factory: sessionmaker[Session]) -> None:
    first, second = enqueue_n(session_factory, 2)
    assert claim(session_factory, "w1") == (first, "decoding", 1, "w1")
    assert claim(session_factory, "w2") == (second, "decoding", 1, "w2")
    assert claim(session_factory, "w3") is None
    with session_scope(session_factory) as session:
        assert jobs.set_state(session, first, "encoding", 0.5).progress == 0.5
        job = jobs.complete(session, first, worker_id="w1")
        assert (job.state, job.progress, job.lease_owner) == ("ready", 1.0, None)
        assert job.finished_at is not None
        assert jobs.counts_by_state(session) == {
            "queued": 0,
            "downloading": 0,
            "decoding": 1,
            "encoding": 0,
            "ready": 1,
            "failed": 0,
            "cancelled": 0,
        }


def test_bad_arguments_are_refused(session_factory: sessionmaker[Session]) -> None:
    (job_id,) = enqueue_n(session_factory, 1)
    with session_scope(session_factory) as session:
        with pytest.raises(ValueError, match="kind"):
            jobs.enqueue(session, "transcode", None, MODEL)
        with pytest.raises(ValueError, match="complete"):
            jobs.set_state(session, job_id, "ready")
        with pytest.raises(ValueError, match="0..1"):
            jobs.set_state(session, job_id, "encoding", 1.5)
        assert jobs.get_job(session, 424242) is None
        assert jobs.complete(session, 424242) is None


def test_expired_lease_hands_the_job_to_another_worker(session_factory: sessionmaker[Session]) -> None:
    (job_id,) = enqueue_n(session_factory, 1)
    t0 = utcnow()
    assert claim(session_factory, "dead", now=t0, lease_s=60)[0] == job_id
    assert claim(session_factory, "other", now=t0 + timedelta(seconds=59)) is None
    assert claim(session_factory, "other", now=t0 + timedelta(seconds=61)) == (job_id, "decoding", 2, "other")
    with session_scope(session_factory) as session:
        # The first worker comes back: it has lost the job and cannot touch it any more.
        assert jobs.heartbeat(session, job_id, "dead", 60) is False
        assert jobs.set_state(session, job_id, "encoding", 0.9, worker_id="dead") is None
        assert jobs.complete(session, job_id, worker_id="dead") is None
        assert jobs.get_job(session, job_id).lease_owner == "other"


def test_heartbeat_keeps_the_lease(session_factory: sessionmaker[Session]) -> None:
    (job_id,) = enqueue_n(session_factory, 1)
    t0 = utcnow()
    claim(session_factory, "w1", now=t0, lease_s=60)
    with session_scope(session_factory) as session:
        assert jobs.heartbeat(session, job_id, "w1", 60, now=t0 + timedelta(seconds=50)) is True
    assert claim(session_factory, "w2", now=t0 + timedelta(seconds=100)) is None
    assert claim(session_factory, "w2", now=t0 + timedelta(seconds=111))[0] == job_id


def test_retryable_failures_back_off_then_fail(session_factory: sessionmaker[Session]) -> None:
    (job_id,) = enqueue_n(session_factory, 1, max_attempts=3)
    now = utcnow()
    for attempt in (1, 2):
        assert claim(session_factory, "w", now=now) == (job_id, "decoding", attempt, "w")
        with session_scope(session_factory) as session:
            job = jobs.fail(session, job_id, f"decode error {attempt}", retryable=True, now=now)
            assert job.state == "queued" and job.error == f"decode error {attempt}"
            delay = jobs.backoff_delay(attempt)
            assert job.run_after == now + delay
        assert claim(session_factory, "w", now=now + delay - timedelta(seconds=1)) is None
        now = now + delay
    assert jobs.backoff_delay(2) == 2 * jobs.backoff_delay(1)
    assert claim(session_factory, "w", now=now)[2] == 3
    with session_scope(session_factory) as session:
        job = jobs.fail(session, job_id, "decode error 3", retryable=True, now=now)
        assert (job.state, job.attempts, job.finished_at) == ("failed", 3, now)
    assert claim(session_factory, "w", now=now + timedelta(days=1)) is None


def test_non_retryable_failure_is_final(session_factory: sessionmaker[Session]) -> None:
    (job_id,) = enqueue_n(session_factory, 1, max_attempts=3)
    claim(session_factory, "w")
    with session_scope(session_factory) as session:
        job = jobs.fail(session, job_id, "not a video file", retryable=False)
        assert (job.state, job.attempts) == ("failed", 1)


def test_a_worker_dying_on_the_last_attempt_fails_the_job(session_factory: sessionmaker[Session]) -> None:
    (job_id,) = enqueue_n(session_factory, 1, max_attempts=1)
    t0 = utcnow()
    claim(session_factory, "dies", now=t0, lease_s=10)
    assert claim(session_factory, "next", now=t0 + timedelta(seconds=11)) is None
    with session_scope(session_factory) as session:
        job = jobs.get_job(session, job_id)
        assert job.state == "failed" and "lease" in job.error


def test_racing_workers_never_share_a_job(session_factory: sessionmaker[Session]) -> None:
    job_ids = enqueue_n(session_factory, 60)
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(name: str) -> None:
        mine = claimed.setdefault(name, [])
        try:
            start.wait(timeout=30)
            while (got := claim(session_factory, name)) is not None:
                mine.append(got[0])
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    everything = [job_id for ids in claimed.values() for job_id in ids]
    assert sorted(everything) == job_ids  # each job exactly once


def test_a_url_job_is_claimed_downloading_and_a_stopping_worker_gives_it_back(
    session_factory: sessionmaker[Session],
) -> None:
    with session_scope(session_factory) as session:
        job_id = jobs.enqueue(session, "ingest", None, MODEL, url="https://example.com/a.mp4", title="a").id
    assert claim(session_factory, "w1") == (job_id, "downloading", 1, "w1")
    with session_scope(session_factory) as session:
        assert jobs.set_download(session, job_id, 50, 200, worker_id="w1").progress == 0.25
        assert jobs.release(session, job_id, worker_id="w2") is None  # not its job
        job = jobs.release(session, job_id, worker_id="w1")
        assert (job.state, job.attempts, job.lease_owner, job.bytes_done) == ("queued", 0, None, None)
    assert claim(session_factory, "w2") == (job_id, "downloading", 1, "w2")


def test_cancel_and_retry_follow_the_state(session_factory: sessionmaker[Session]) -> None:
    (job_id,) = enqueue_n(session_factory, 1)
    with session_scope(session_factory) as session:
        with pytest.raises(jobs.JobStateError, match="queued"):
            jobs.retry(session, job_id)
    claim(session_factory, "w1")
    with session_scope(session_factory) as session:
        assert jobs.cancel(session, job_id).state == "cancelled"
        # The worker that held it can no longer record anything on it, nor complete it.
        assert jobs.set_state(session, job_id, "encoding", 0.5, worker_id="w1") is None
        assert jobs.complete(session, job_id, worker_id="w1") is None
        with pytest.raises(jobs.JobStateError, match="cancelled"):
            jobs.cancel(session, job_id)
        assert jobs.retry(session, job_id).state == "queued"
        assert jobs.cancel(session, 10**9) is None and jobs.retry(session, 10**9) is None
