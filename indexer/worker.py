"""The job worker: claims ingest jobs under a lease, runs them through the pipeline, heartbeats, retries.

A little over 400 lines: one class whose lease, cancel checks and outcome handling share its lock and
in-flight table; the download stage and the failure texts already live apart (downloads.py, failures.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta

from sqlalchemy import exc as sa_exc
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog, jobs
from indexer.catalog import IndexMismatchError, Job, register_model
from indexer.db import session_scope, utcnow
from indexer.downloads import Download, download_job
from indexer.errors import IndexerError
from indexer.failures import failure_reason
from indexer.milvus_schema import MilvusUnavailableError
from indexer.paths import DataDir
from indexer.pipeline import (
    Encoder,
    PipelineConfig,
    TaskCancelledError,
    TaskResult,
    VectorSink,
    VideoTask,
    Writer,
    run_pipeline,
)
from indexer.token_store import TokenStore
from indexer.url_fetch import UrlFetcher
from model.tokenbinder import TokenBinder

logger = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 1.0  # job progress rows are throttled: each update is a catalog write
_CANCEL_CHECK_EVERY_S = 0.5  # how soon a running job notices DELETE /jobs/{id}: one catalog read per period
DEFAULT_MAX_DOWNLOAD_BYTES = 2 * 1024**3
_CLAIM_BACKOFF_MAX_S = 10.0
_OUTAGE_RETRY = timedelta(seconds=2)  # while the vector database is down, a job is tried again this often


class LostLeaseError(IndexerError, RuntimeError):
    """Another worker took the job over (this one's lease expired); its work is not committed."""


def default_worker_id() -> str:
    # host:pid lets a restarted process on the same host take back the jobs of a dead one at once.
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """Runs ingest jobs with one model. One thread in the API process on SQLite; many processes on PostgreSQL."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        data: DataDir,
        model: TokenBinder,
        worker_id: str | None = None,
        lease_s: float = 60.0,
        poll_s: float = 1.0,
        *,
        config: PipelineConfig | None = None,
        on_result: Callable[[TaskResult], None] | None = None,
        require_active: bool = True,
        fetcher: UrlFetcher | None = None,
        max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
        sink: VectorSink | None = None,
    ) -> None:
        self.factory, self.data, self.model = session_factory, data, model
        self.worker_id = worker_id or default_worker_id()
        self.lease_s, self.poll_s = lease_s, poll_s
        self.config = config or PipelineConfig()
        self.model_id = model.model_id
        cfg = model.config
        self.store = TokenStore(data.tokens_dir(self.model_id), cfg.num_frames, cfg.embed_dim)
        self.encoder = Encoder(model)
        self.writer = Writer(
            session_factory,
            data,
            self.model_id,
            self.store,
            on_commit=self._complete,
            jpeg_quality=85,
            sink=sink,
        )
        self._observer = on_result
        self._inflight: dict[int, tuple[str, float]] = {}  # job id -> (state, monotonic time) last written
        self._claimed_at: dict[int, float] = {}  # job id -> monotonic time it was claimed (the outcome line)
        self._lock = threading.Lock()
        self._registered = False
        self._require_active = require_active
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fetcher = fetcher or UrlFetcher()  # the default refuses private addresses
        self.max_download_bytes = max_download_bytes
        self._cancel_checked: dict[int, tuple[float, bool]] = {}  # job id -> (monotonic time, cancelled)
        self._running: threading.Event | None = None

    # --- public -----------------------------------------------------------------------------------------
    def run_once(self) -> bool:
        """Claim one job and run it to the end; False when no job was ready."""
        self._prepare()
        task = self._claim_task()
        if task is None:
            return False
        self._pipeline(iter([task]), threading.Event())
        return True

    def run(
        self, stop_event: threading.Event | None = None, *, until: Callable[[], bool] | None = None
    ) -> None:
        """Process jobs until `stop_event` is set, or (with `until`) once nothing is claimable and until() holds."""
        stop = stop_event or self._stop
        self._running = stop  # a download in progress ends early when it is set
        self._prepare()
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat_loop, args=(done,), name="heartbeat", daemon=True)
        beat.start()
        try:
            self._pipeline(self._tasks(stop, until, done), stop)
        finally:
            done.set()

    def process(self, tasks: Iterable[VideoTask], stop: threading.Event | None = None) -> None:
        """Run tasks that are not queue jobs (`indexer reindex`); results go to `on_result`."""
        self._prepare()
        self._pipeline(iter(tasks), stop or threading.Event())

    def start_thread(self) -> threading.Thread:
        """Run in a daemon thread until stop()."""
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run, args=(self._stop,), name="ingest-worker", daemon=True
        )
        self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        self.stop()
        self.store.close()

    # --- claiming ---------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        if not self._registered:
            register_model(self.factory, self.model, require_active=self._require_active)
            self._registered = True
        self._take_back_dead_local_leases()

    def _tasks(
        self, stop: threading.Event, until: Callable[[], bool] | None, done: threading.Event
    ) -> Iterator[VideoTask]:
        failures = 0
        while not stop.is_set() and not done.is_set():
            try:
                task = self._claim_task()
            except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as e:
                # The database is restarting or unreachable: wait and claim again rather than die.
                failures += 1
                delay = min(_CLAIM_BACKOFF_MAX_S, self.poll_s * 2 ** min(failures, 8))
                logger.warning("cannot claim jobs, the database is unreachable (%s); retrying in %.1f s",
                               type(e).__name__, delay)  # fmt: skip
                stop.wait(delay)
                continue
            failures = 0
            if task is not None:
                yield task
            elif until is not None and until():
                return
            else:
                stop.wait(self.poll_s)

    def _claim_task(self) -> VideoTask | None:
        while True:
            with session_scope(self.factory) as session:
                active = catalog.get_active_model(session)
                if self._require_active and active is not None and active.id != self.model_id:
                    # The library switched models under this worker: stop before taking another job.
                    raise IndexMismatchError(
                        f"the active model is now {active.id!r}; restart this worker with that model"
                    )
                job = jobs.claim_next(session, self.worker_id, self.lease_s)
                if job is None:
                    return None
                if job.state == "downloading":
                    download: Download | None = Download(job.id, job.url or "", job.title, job.meta)
                    task = None
                else:
                    download = None
                    task = self._task_for(
                        session, job, mine_active=active is None or active.id == self.model_id
                    )
            if download is not None:
                with self._lock:
                    self._inflight[download.job_id] = ("downloading", time.monotonic())
                    self._claimed_at[download.job_id] = time.monotonic()
                task = download_job(self, download)
                if task is None:
                    with self._lock:
                        self._inflight.pop(download.job_id, None)
                        self._cancel_checked.pop(download.job_id, None)
                        self._claimed_at.pop(download.job_id, None)
                    continue
            if task is not None:
                with self._lock:
                    self._inflight[task.job_id or -1] = ("decoding", time.monotonic())
                    self._claimed_at.setdefault(task.job_id or -1, time.monotonic())
                return task

    def _task_for(self, session: Session, job: Job, *, mine_active: bool) -> VideoTask | None:
        """The job as a pipeline task, or None after settling a job that cannot run here."""
        video = catalog.get_video(session, job.video_id) if job.video_id is not None else None
        if video is None or video.status == "deleted" or not video.stored_path:
            jobs.fail(session, job.id, "the video was deleted", retryable=False, worker_id=self.worker_id)
            return None
        if job.kind == "reindex" and job.model_id != self.model_id:
            # Another model's generation: leave it to a worker (or `indexer reindex`) running that model.
            delay = timedelta(seconds=max(self.poll_s, 5.0))
            session.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(state="queued", attempts=Job.attempts - 1, lease_owner=None, lease_expires_at=None,
                        run_after=utcnow() + delay)
            )  # fmt: skip
            return None
        if job.kind == "ingest":
            video.status = "indexing"
        # An ingest always settles the video's status; a reindex job only for the active model.
        set_ready = job.kind == "ingest" or mine_active
        return VideoTask(video.id, self.data.resolve(video.stored_path), job.id, set_ready=set_ready)

    def _take_back_dead_local_leases(self) -> None:
        """Expire the leases of workers on this host whose process is gone, so their jobs resume now."""
        host = socket.gethostname()
        with session_scope(self.factory) as session:
            rows = session.execute(
                select(Job.id, Job.lease_owner).where(
                    Job.state.in_(jobs.ACTIVE_STATES), Job.lease_owner.like(f"{host}:%")
                )
            ).all()
            dead = [job_id for job_id, owner in rows if not _alive(owner)]
            if dead:
                logger.info("resuming jobs %s of a stopped worker on this host", dead)
                session.execute(
                    update(Job)
                    .where(Job.id.in_(dead))
                    .values(lease_expires_at=utcnow() - timedelta(seconds=1))
                )

    # --- job bookkeeping ------------------------------------------------------------------------------
    def _heartbeat_loop(self, done: threading.Event) -> None:
        while not done.wait(self.lease_s / 3):
            with self._lock:
                ids = list(self._inflight)
            for job_id in ids:
                try:
                    with session_scope(self.factory) as session:
                        if not jobs.heartbeat(session, job_id, self.worker_id, self.lease_s):
                            logger.warning("lost the lease of job %s; another worker has it", job_id)
                except Exception:
                    logger.exception("heartbeat for job %s failed; will retry", job_id)

    def _complete(self, session: Session, task: VideoTask) -> None:
        if task.job_id is None:
            return
        # Lock the row so a worker taking over an expired lease cannot interleave with this commit.
        session.execute(select(Job.id).where(Job.id == task.job_id).with_for_update()).all()
        if jobs.complete(session, task.job_id, worker_id=self.worker_id) is None:
            raise LostLeaseError(f"job {task.job_id} was taken over by another worker; not committing")

    def _progress(self, task: VideoTask, state: str, fraction: float) -> None:
        if task.job_id is None:
            return
        now = time.monotonic()
        with self._lock:
            last = self._inflight.get(task.job_id)
            # A new state is written at once; progress within a state at most every _PROGRESS_EVERY_S.
            if last is None or (last[0] == state and now - last[1] < _PROGRESS_EVERY_S):
                return
            self._inflight[task.job_id] = (state, now)
        try:
            with session_scope(self.factory) as session:
                jobs.set_state(session, task.job_id, state, fraction, worker_id=self.worker_id)
        except Exception:
            logger.exception("could not record progress of job %s", task.job_id)

    def download_progress(self, job_id: int, done: int, total: int | None) -> None:
        """A download's bytes so far, written at most every _PROGRESS_EVERY_S."""
        now = time.monotonic()
        with self._lock:
            last = self._inflight.get(job_id)
            if last is not None and now - last[1] < _PROGRESS_EVERY_S and done != total:
                return
            self._inflight[job_id] = ("downloading", now)
        try:
            with session_scope(self.factory) as session:
                jobs.set_download(session, job_id, done, total, worker_id=self.worker_id)
        except Exception:
            logger.exception("could not record the download progress of job %s", job_id)

    def stopping(self) -> bool:
        """Whether run() was asked to stop (a long download gives its job back instead of finishing)."""
        return self._running is not None and self._running.is_set()

    def job_cancelled(self, job_id: int) -> bool:
        """Whether the job is no longer this worker's to run (cancelled, or taken over); read at most every
        _CANCEL_CHECK_EVERY_S per job."""
        now = time.monotonic()
        with self._lock:
            checked = self._cancel_checked.get(job_id)
        if checked is not None and (checked[1] or now - checked[0] < _CANCEL_CHECK_EVERY_S):
            return checked[1]
        try:
            with session_scope(self.factory) as session:
                row = session.execute(select(Job.state, Job.lease_owner).where(Job.id == job_id)).first()
        except Exception:
            logger.exception("could not check whether job %s was cancelled", job_id)
            return False
        gone = row is None or row.state not in jobs.ACTIVE_STATES or row.lease_owner != self.worker_id
        with self._lock:
            self._cancel_checked[job_id] = (now, gone)
        if gone:
            logger.info("job %s was cancelled (or taken over); stopping its work", job_id)
        return gone

    def _task_cancelled(self, task: VideoTask) -> bool:
        return task.job_id is not None and self.job_cancelled(task.job_id)

    def _on_result(self, result: TaskResult) -> None:
        task = result.task
        with self._lock:
            self._inflight.pop(task.job_id or -1, None)
            self._cancel_checked.pop(task.job_id or -1, None)
            claimed = self._claimed_at.pop(task.job_id or -1, None)
        state, reason = "ready", None
        if isinstance(result.error, MilvusUnavailableError) and task.job_id is not None:
            # The vector database is down: the job waits for it, without spending one of its attempts.
            with session_scope(self.factory) as session:
                jobs.postpone(
                    session, task.job_id, str(result.error), _OUTAGE_RETRY, worker_id=self.worker_id
                )
            state, reason = "queued", str(result.error)
        elif isinstance(result.error, LostLeaseError):
            state, reason = "lost", str(result.error)
        elif isinstance(result.error, TaskCancelledError):
            state, reason = "cancelled", str(result.error)
        elif not result.ok and task.job_id is not None:
            reason = failure_reason(result.error) if result.error is not None else "unknown error"
            with session_scope(self.factory) as session:
                job = jobs.fail(session, task.job_id, reason, result.retryable, worker_id=self.worker_id)
                video = catalog.get_video(session, task.video_id)
                if job is not None and job.state == "failed" and task.set_ready and video is not None:
                    if video.status != "deleted":
                        catalog.set_video_status(session, task.video_id, "failed", error=reason)
            state = job.state if job is not None else "failed"
        if task.job_id is not None:
            _log_outcome(task, state, time.monotonic() - claimed if claimed else None, reason)
        if self._observer is not None:
            self._observer(result)

    def _pipeline(self, tasks: Iterator[VideoTask], stop: threading.Event) -> None:
        cfg = self.model.config
        run_pipeline(
            tasks,
            num_frames=cfg.num_frames,
            size=cfg.image_size,
            encoder=self.encoder,
            writer=self.writer,
            on_result=self._on_result,
            on_progress=self._progress,
            config=self.config,
            stop=stop,
            cancelled=self._task_cancelled,
        )


def _log_outcome(task: VideoTask, state: str, seconds: float | None, error: str | None) -> None:
    """One line a job: id, video, how it ended (ready, failed, queued again for a retry, lost), time, error."""
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    level = logging.INFO if state == "ready" else logging.WARNING
    logger.log(
        level,
        "job %s video %s (%s): %s%s%s",
        task.job_id,
        task.video_id,
        task.path.name,
        state,
        took,
        f": {error}" if error else "",
        extra={
            "job_id": task.job_id,
            "video_id": task.video_id,
            "video": str(task.path),
            "state": state,
            "seconds": round(seconds, 3) if seconds is not None else None,
            "error": error,
        },
    )


def _alive(owner: str | None) -> bool:
    parts = (owner or "").split(":")
    if len(parts) < 2 or not parts[1].isdigit():
        return True  # not ours to judge: wait for its lease to expire
    pid = int(parts[1])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
