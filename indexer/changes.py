"""The change feed: read segment adds and deletes by seq, and follow them into an in-memory index."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from indexer.catalog import Change, FeedHorizon
from indexer.db import utcnow
from indexer.errors import IndexerError
from model.openmp import release_openmp_threads

logger = logging.getLogger(__name__)


def latest_seq(session: Session, model_id: str | None = None) -> int:
    """The newest seq in the feed, or in one model's feed, counting pruned changes too."""
    newest, pruned = select(func.max(Change.seq)), select(func.max(FeedHorizon.pruned_through))
    if model_id is not None:
        newest, pruned = (
            newest.where(Change.model_id == model_id),
            pruned.where(FeedHorizon.model_id == model_id),
        )
    return max(session.scalar(newest) or 0, session.scalar(pruned) or 0)


def changes_since(session: Session, seq: int, model_id: str | None = None, limit: int = 1000) -> list[Change]:
    """Changes with a seq above `seq`, oldest first; `model_id=None` returns every model's."""
    stmt = select(Change).where(Change.seq > seq)
    if model_id is not None:
        stmt = stmt.where(Change.model_id == model_id)
    return list(session.scalars(stmt.order_by(Change.seq).limit(limit)))


def feed_horizon(session: Session, model_id: str) -> int:
    """Changes of the model with a seq up to this one may have been pruned (0: none were)."""
    return session.scalar(select(FeedHorizon.pruned_through).where(FeedHorizon.model_id == model_id)) or 0


@dataclass(frozen=True)
class FeedLag:
    """Where a follower stands in its model's feed, as of its last read.

    `rows` counts the model's changes committed but not read yet; `oldest_unread_at` is the `created_at`
    of the first of them (stamped by the writer's clock), None when there are none.
    """

    position: int
    head: int
    rows: int = 0
    oldest_unread_at: datetime | None = None

    def seconds(self, now: datetime | None = None) -> float:
        """How long the oldest unread change has been waiting (0 when nothing is unread)."""
        if self.oldest_unread_at is None:
            return 0.0
        return max(0.0, ((now or utcnow()) - self.oldest_unread_at).total_seconds())


def feed_lag(session: Session, model_id: str, position: int, read_up_to: int) -> FeedLag:
    """The model's changes above `read_up_to` (the highest seq read): how many, the newest, the oldest's time.

    Served by the (model_id, seq) index: only this model's entries are visited.
    """
    mine_after = (Change.model_id == model_id, Change.seq > read_up_to)
    rows, head = session.execute(select(func.count(), func.max(Change.seq)).where(*mine_after)).one()
    oldest = session.scalar(select(Change.created_at).where(*mine_after).order_by(Change.seq).limit(1))
    return FeedLag(position, head or read_up_to, rows, oldest)


class _Row(NamedTuple):
    seq: int
    segment_id: int
    op: str


class FeedPrunedError(IndexerError, RuntimeError):
    """The feed was pruned past a follower's position and it has no way to reload its index."""


@dataclass
class _Gap:
    """Seqs lo..hi (inclusive) not seen yet: still being committed, rolled back, or another model's."""

    lo: int
    hi: int
    since: float


class ChangeFollower:
    """Applies one model's changes, in seq order, through `apply_add` / `apply_delete`.

    Only this model's rows are read (by the (model_id, seq) index). Seqs between them belong to other
    models or are not committed yet: on PostgreSQL a transaction can commit a seq below one already
    visible. Such a range is kept as a gap until every seq in it is committed (counted, not fetched), and
    re-read for this model's rows meanwhile; after `gap_grace_s` seconds it is given up (a rolled-back
    transaction leaves seqs that never fill). `last_seq` is the seq below which everything was applied:
    persist it with the index and pass it back as `start_seq`. Seqs just below `start_seq` (within
    `lookback`) are watched as gaps too, since a snapshot taken at `start_seq` cannot contain changes that
    committed after it. Apply callbacks must therefore tolerate an id they have already seen.

    When the feed was pruned (`indexer compact`) past `last_seq`, the rows this follower still needs
    may be gone: it calls `reload(horizon)`, which must rebuild the index from a snapshot or the catalog
    covering at least `horizon` and return the seq it covers, and follows on from there.
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
        reload: Callable[[int], int] | None = None,
        batch_size: int = 1000,
        gap_grace_s: float = 10.0,
        lookback: int = 1000,
        max_backoff_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = session_factory
        self.model_id = model_id
        self._apply = {"add": apply_add, "delete": apply_delete}
        self._reload = reload
        self.interval_s = interval_s
        self._batch_size = batch_size
        self._grace_s = gap_grace_s
        self._lookback = lookback
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._restart_at(start_seq)

    def _restart_at(self, seq: int) -> None:
        self._high = seq  # every seq up to here was read, is another model's, or is in a gap
        self._gaps: list[_Gap] = []
        self._looked_back = seq <= 0
        # Published whole, so readers (a snapshot, /health) never wait for a poll in progress.
        self.lag = FeedLag(seq, seq)

    @property
    def last_seq(self) -> int:
        """Every change of this model with a seq up to this one has been applied (or given up on)."""
        return self.lag.position

    def _position(self) -> int:
        return self._gaps[0].lo - 1 if self._gaps else self._high

    def poll(self) -> int:
        """Apply what is new; returns how many of this model's changes were applied."""
        with self._lock:
            with self._factory() as session:
                if not self._looked_back:
                    self._watch_below_start(session)
                settled = self._settled_gaps(session)  # counted before the read: none of ours can slip by
                position = self._position()
                rows, more = self._read(session)
                horizon = feed_horizon(session, self.model_id)
            if horizon > position:
                self._restart_below(horizon, position)
                return 0
            applied = self._apply_in_order(rows)
            self._gaps = [g for g in self._gaps if not any(lo <= g.lo and g.hi <= hi for lo, hi in settled)]
            self._expire_gaps()
            self._publish(more)
            return applied

    def measure(self) -> FeedLag:
        """Count what is unread now (a poll only does when its read was full) and publish it."""
        with self._lock:
            self._publish(more=True)
            return self.lag

    def _publish(self, more: bool) -> None:
        if more:
            with self._factory() as session:
                self.lag = feed_lag(session, self.model_id, self._position(), self._high)
        else:
            self.lag = FeedLag(self._position(), self._high)

    def _restart_below(self, horizon: int, position: int) -> None:
        if self._reload is None:
            raise FeedPrunedError(
                f"the change feed of {self.model_id} was pruned through seq {horizon}, past this follower's "
                f"position {position}; reload the index from its snapshot (or rebuild it) and follow from there"
            )
        logger.warning(
            "the change feed of %s was pruned through seq %d, past this index's position %d; reloading it",
            self.model_id,
            horizon,
            position,
        )
        self._restart_at(self._reload(horizon))
        self._publish(more=True)

    def _watch_below_start(self, session: Session) -> None:
        lo = max(1, self._high - self._lookback + 1, feed_horizon(session, self.model_id) + 1)
        hi = self._high
        self._looked_back = True
        if lo > hi or _committed(session, lo, hi) == hi - lo + 1:
            return
        # Some seq is missing: find which (seq numbers only, at most `lookback` of them, once).
        present = set(session.scalars(select(Change.seq).where(Change.seq.between(lo, hi))))
        now = self._clock()
        for seq in range(lo, hi + 1):
            if seq not in present:
                self._add_gap(seq, seq, now)

    def _settled_gaps(self, session: Session) -> list[tuple[int, int]]:
        """Gaps whose every seq is committed now (to some model)."""
        return [(g.lo, g.hi) for g in self._gaps if _committed(session, g.lo, g.hi) == g.hi - g.lo + 1]

    def _read(self, session: Session) -> tuple[list[_Row], bool]:
        """This model's rows above the high mark and in the gaps, in seq order; and whether more are waiting.

        Plain (seq, segment_id, op) tuples: building ORM objects cost several times the query on a replay.
        """
        mine = select(Change.seq, Change.segment_id, Change.op).where(Change.model_id == self.model_id)
        above = mine.where(Change.seq > self._high).order_by(Change.seq).limit(self._batch_size)
        rows = [_Row(*r) for r in session.execute(above)]
        more = len(rows) >= self._batch_size
        if self._gaps:
            in_gap = or_(*(Change.seq.between(g.lo, g.hi) for g in self._gaps))
            stmt = mine.where(in_gap).order_by(Change.seq).limit(self._batch_size)
            rows += [_Row(*r) for r in session.execute(stmt)]
        return sorted(rows, key=lambda c: c.seq), more

    def _apply_in_order(self, rows: Sequence[_Row]) -> int:
        """Apply runs of same-op changes; a run's seqs count as seen only once its callback returned."""
        applied = 0
        run: list[_Row] = []
        for row in [*rows, None]:
            if run and (row is None or row.op != run[0].op):
                self._apply[run[0].op]([c.segment_id for c in run])
                applied += len(run)
                for change in run:
                    self._mark_seen(change.seq)
                run = []
            if row is not None:
                run.append(row)
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
            # More waiting: read on without sleeping.
            if not self.lag.rows:
                if applied:
                    # Adding to an HNSW index ran faiss's OpenMP pool in this thread; an idle pool left
                    # alive slows the search thread's (model.openmp).
                    release_openmp_threads()
                self._stop.wait(self.interval_s)


def _committed(session: Session, lo: int, hi: int) -> int:
    """How many seqs in lo..hi are committed, to any model (an index-only count: no rows are fetched)."""
    return session.scalar(select(func.count()).select_from(Change).where(Change.seq.between(lo, hi))) or 0
