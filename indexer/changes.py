"""The change feed: read segment adds and deletes by seq, and follow them into an in-memory index."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from indexer.catalog import Change
from model.openmp import release_openmp_threads

logger = logging.getLogger(__name__)


def latest_seq(session: Session) -> int:
    return session.scalar(select(func.max(Change.seq))) or 0


def changes_since(session: Session, seq: int, model_id: str | None = None, limit: int = 1000) -> list[Change]:
    """Changes with a seq above `seq`, oldest first; `model_id=None` returns every model's."""
    stmt = select(Change).where(Change.seq > seq)
    if model_id is not None:
        stmt = stmt.where(Change.model_id == model_id)
    return list(session.scalars(stmt.order_by(Change.seq).limit(limit)))


@dataclass
class _Gap:
    """Seqs lo..hi (inclusive) not seen yet: still being committed, or rolled back."""

    lo: int
    hi: int
    since: float


class ChangeFollower:
    """Applies one model's changes, in seq order, through `apply_add` / `apply_delete`.

    On PostgreSQL a transaction can commit a seq below one already visible, so a missing seq is
    kept as a gap and re-read for `gap_grace_s` seconds before it is given up (a rolled-back
    transaction leaves gaps that never fill). `last_seq` is the seq below which everything was
    applied: persist it with the index and pass it back as `start_seq`. Seqs missing just below
    `start_seq` (within `lookback`) are watched as gaps too, since a snapshot taken at `start_seq`
    cannot contain changes that committed after it. Apply callbacks must therefore tolerate an id
    they have already seen (after a restart from `last_seq`).
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        model_id: str,
        apply_add: Callable[[list[int]], None],
        apply_delete: Callable[[list[int]], None],
        start_seq: int,
        interval_s: float = 0.25,
        *,
        batch_size: int = 1000,
        gap_grace_s: float = 10.0,
        lookback: int = 1000,
        max_backoff_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = session_factory
        self.model_id = model_id
        self._apply = {"add": apply_add, "delete": apply_delete}
        self.interval_s = interval_s
        self._batch_size = batch_size
        self._grace_s = gap_grace_s
        self._lookback = lookback
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self._high = start_seq  # highest seq seen
        self._gaps: list[_Gap] = []
        self._looked_back = start_seq <= 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def last_seq(self) -> int:
        """Every change with a seq up to this one has been applied (or given up on)."""
        with self._lock:
            return self._gaps[0].lo - 1 if self._gaps else self._high

    def poll(self) -> int:
        """Apply what is new; returns how many of this model's changes were applied."""
        with self._lock:
            with self._factory() as session:
                if not self._looked_back:
                    self._watch_below_start(session)
                rows = self._read(session)
            applied = self._apply_in_order(rows)
            self._expire_gaps()
            return applied

    def _watch_below_start(self, session: Session) -> None:
        lo = max(1, self._high - self._lookback + 1)
        present = set(session.scalars(select(Change.seq).where(Change.seq >= lo, Change.seq <= self._high)))
        now = self._clock()
        for seq in range(lo, self._high + 1):
            if seq not in present:
                self._add_gap(seq, seq, now)
        self._looked_back = True

    def _read(self, session: Session) -> list[Change]:
        rows = changes_since(session, self._high, None, self._batch_size)
        if self._gaps:
            in_gap = or_(*(Change.seq.between(g.lo, g.hi) for g in self._gaps))
            rows += session.scalars(select(Change).where(in_gap).order_by(Change.seq).limit(self._batch_size))
        return sorted(rows, key=lambda c: c.seq)

    def _apply_in_order(self, rows: Sequence[Change]) -> int:
        """Apply runs of same-op changes; a run's seqs count as seen only once its callback returned."""
        applied = 0
        run: list[Change] = []
        run_op: str | None = None
        for row in [*rows, None]:
            mine = row is not None and row.model_id == self.model_id
            if row is None or (mine and run_op is not None and row.op != run_op):
                ids = [c.segment_id for c in run if c.model_id == self.model_id]
                if ids and run_op is not None:
                    self._apply[run_op](ids)
                    applied += len(ids)
                for change in run:
                    self._mark_seen(change.seq)
                run, run_op = [], None
            if row is not None:
                run.append(row)
                if mine:
                    run_op = row.op
        return applied

    def _mark_seen(self, seq: int) -> None:
        if seq > self._high:
            if seq > self._high + 1:
                self._add_gap(self._high + 1, seq - 1, self._clock())
            self._high = seq
            return
        for i, gap in enumerate(self._gaps):
            if gap.lo <= seq <= gap.hi:
                parts = [_Gap(gap.lo, seq - 1, gap.since), _Gap(seq + 1, gap.hi, gap.since)]
                self._gaps[i : i + 1] = [p for p in parts if p.lo <= p.hi]
                return

    def _add_gap(self, lo: int, hi: int, since: float) -> None:
        self._gaps.append(_Gap(lo, hi, since))
        self._gaps.sort(key=lambda g: g.lo)

    def _expire_gaps(self) -> None:
        now = self._clock()
        for gap in [g for g in self._gaps if now - g.since > self._grace_s]:
            logger.warning(
                "change seqs %s..%s never appeared within %.0f s (rolled back, or committed very late); "
                "skipping them; if segments are missing from search, run `indexer rebuild-index`",
                gap.lo,
                gap.hi,
                self._grace_s,
            )
            self._gaps.remove(gap)

    def start(self) -> None:
        """Follow the feed in a daemon thread until stop()."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"change-follower-{self.model_id}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                applied = self.poll()
            except Exception:
                # The database may be restarting or unreachable; keep the state and try again later.
                failures += 1
                delay = min(self._max_backoff_s, self.interval_s * 2**failures)
                logger.exception(
                    "change follower for %s failed (%d in a row); retrying", self.model_id, failures
                )
                self._stop.wait(delay)
                continue
            failures = 0
            # A full batch means more is waiting: read on without sleeping.
            if applied < self._batch_size:
                if applied:
                    # Adding to an HNSW index ran faiss's OpenMP pool in this thread; an idle pool left
                    # alive slows the search thread's (model.openmp).
                    release_openmp_threads()
                self._stop.wait(self.interval_s)
