"""A reader/writer lock: many concurrent searches, one exclusive mutation (the live FAISS index's)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RWLock:
    """Many concurrent searches, one exclusive mutation; waiting writers block new readers.

    Readers that were waiting when a write ends go before the next writer, so a mutation applied in
    slices (add()) lets the searches queued behind each slice run between slices instead of after all.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0  # writers
        self._read_waiting = 0
        self._owed = 0  # readers let in ahead of waiting writers when the last write ended

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            if self._writer or self._waiting:
                self._read_waiting += 1
                while self._writer or (self._waiting and not self._owed):
                    self._cond.wait()
                self._read_waiting -= 1
                self._owed = max(self._owed - 1, 0)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers or self._owed:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._owed = self._read_waiting
                self._cond.notify_all()
