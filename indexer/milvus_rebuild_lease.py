"""One `indexer rebuild-index --backend milvus` at a time per model: a lease in the model's next record.

The next record (milvus_generations.NextRecord, a row of `<prefix>_generations`) says who rebuilds the
model's name, until when (unix time, renewed every third of the lease by a heartbeat thread) and which
generation it fills; writers read the same record to write to that generation too. A second rebuild that
finds a live record refuses with RebuildInProgressError (exit 2); one that finds an expired record (its
owner crashed, or stalled past the lease) takes it over, says so in the log, and its switch later drops
the half-filled generation the dead one left.

Milvus has no conditional write, so a claim is write-then-look: the claimant writes its record, waits
`settle_s`, reads it back, and goes on only if it is still its own. Two claims at once both write; the
record keeps the later one, and the earlier claimant sees that and refuses. This fails only if a claimant
stalls longer than `settle_s` between reading "no live lease" and writing its own. Before the switch the
rebuild reads the record once more and stops if it is no longer its own.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

from indexer.errors import IndexerError, UserError
from indexer.milvus_generations import NextRecord
from indexer.milvus_index import MilvusIndex

logger = logging.getLogger(__name__)

LEASE_S = 30.0  # a crashed rebuild blocks the next one at most this long
SETTLE_S = 1.0


class RebuildInProgressError(IndexerError, UserError):
    """Another rebuild of the same model's Milvus name holds the lease (or took it over from this one)."""

    code = "rebuild_in_progress"


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class RebuildLease:
    """Held while a rebuild runs: `with RebuildLease(index) as lease: ... lease.publish(gen) ...`."""

    def __init__(
        self,
        index: MilvusIndex,
        *,
        lease_s: float = LEASE_S,
        settle_s: float = SETTLE_S,
        clock: Any = time.time,
    ) -> None:
        self.index, self.lease_s, self.settle_s, self.clock = index, lease_s, settle_s, clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.collection = ""
        self.lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._beat: threading.Thread | None = None

    # --- claim and release ------------------------------------------------------------------------------
    def __enter__(self) -> RebuildLease:
        found = self.index.next_record()
        now = self.clock()
        if found is not None and found.owner != self.owner:
            if found.expires > now:
                raise self._refusal(found)
            logger.warning(
                "taking over the rebuild of Milvus name %s from %s, whose lease expired %.0f s ago "
                "(it died or stalled); the generation it was filling (%s) is dropped by this rebuild's switch",
                self.index.name, found.owner, now - found.expires, found.collection or "none yet",
            )  # fmt: skip
        self._write()
        time.sleep(self.settle_s)
        found = self.index.next_record()
        if found is None or found.owner != self.owner:
            raise self._refusal(found)
        self._beat = threading.Thread(target=self._heartbeat, name="rebuild-lease", daemon=True)
        self._beat.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        try:
            found = self.index.next_record()
            if found is not None and found.owner == self.owner:
                self.index.write_next_record(None)
        except Exception as e:  # the lease expires by itself; the next rebuild takes it over
            logger.warning(
                "could not clear the rebuild lease of %s (%s); it expires by itself", self.index.name, e
            )

    def _refusal(self, found: NextRecord | None) -> RebuildInProgressError:
        who = f"{found.owner}, lease until {_when(found.expires)}" if found else "it cleared its record since"
        return RebuildInProgressError(
            f"another `indexer rebuild-index` is rebuilding Milvus name {self.index.name} ({who}); wait for it "
            f"to finish, or if it died, for its lease to expire ({self.lease_s:.0f} s after its last heartbeat)"
        )

    # --- while held ---------------------------------------------------------------------------------------
    def publish(self, collection: str) -> None:
        """Say which generation this rebuild fills: every writer writes to it too from now on (within
        POINTER_TTL_S, and a writer that missed it copies its rows in after its catalog commit)."""
        self.collection = collection
        self.check()
        self._write()

    def check(self) -> None:
        """Raise RebuildInProgressError unless the record is still this rebuild's (read afresh)."""
        found = self.index.next_record()
        if self.lost is None and (found is None or found.owner != self.owner):
            self.lost = f"the record now says {found.owner if found else 'nothing'}"
        if self.lost is not None:
            raise RebuildInProgressError(
                f"this rebuild of Milvus name {self.index.name} lost its lease ({self.lost}): another rebuild "
                "took it over after it expired; this one stops before switching"
            )

    def _write(self) -> None:
        with self._lock:
            record = NextRecord(self.owner, self.clock() + self.lease_s, self.collection)
            self.index.write_next_record(record)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                found = self.index.next_record()
                if found is None or found.owner != self.owner:
                    self.lost = f"the record now says {found.owner if found else 'nothing'}"
                    logger.error("rebuild of Milvus name %s lost its lease: %s", self.index.name, self.lost)
                    return
                self._write()
            except Exception as e:  # Milvus down for a moment: try again at the next beat
                logger.warning("renewing the rebuild lease of %s failed (%s)", self.index.name, e)
