"""Token store: fixed-size fp16 frame-token records addressed by segment id, in memory-mapped shard files."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import IndexerError, UserError
from indexer.paths import fsync_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_FILE_MAGIC = b"TBTOKSHD"
_FILE_HEADER = struct.Struct("<8sIIIIIQ")  # magic, version, T, D, records/shard, record size, shard no
_FILE_HEADER_SIZE = 4096  # records start page-aligned
_REC_MAGIC = b"TBR1"
_REC_HEADER = struct.Struct("<4sIqI12x")  # magic, flags, segment id, crc32(tokens + cls); 32 bytes
_REC_ALIGN = 64
_FLAG_LIVE = 1
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class TokenStoreError(IndexerError):
    """Base class for token store errors."""


class MissingRecordError(TokenStoreError, LookupError):
    """Some segment ids have no valid (present, checksummed) record."""

    def __init__(self, ids: Iterable[int]) -> None:
        self.ids = [int(i) for i in ids]
        shown = ", ".join(map(str, self.ids[:20])) + (" ..." if len(self.ids) > 20 else "")
        super().__init__(
            f"no valid token record for {len(self.ids)} segment id(s): {shown}; the segments were never "
            "written, were freed, or are corrupt: re-ingest them (run `indexer verify` to list all)"
        )


class StoreLayoutError(TokenStoreError, UserError):
    """A shard file does not match the store's layout (T, D, records per shard, format)."""


@dataclass
class _Shard:
    mm: mmap.mmap
    buf: np.ndarray  # uint8 view of the whole mapping
    fd: int | None  # writer only


@functools.cache
def _libc_fallocate() -> Any:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name, use_errno=True).fallocate
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fn


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    fn = _libc_fallocate()
    if fn is None:
        return False
    return fn(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"segment ids must be a 1-D sequence of integers, got shape {arr.shape} {arr.dtype}")
    if arr.min() < 0:
        raise ValueError("segment ids must be non-negative (they are catalog row ids)")
    return arr.astype(np.int64, copy=False)


class TokenStore:
    """Records of frame tokens [T, D] + CLS [D] (fp16), one per segment id, in sparse shard files.

    One writer process, any number of reader processes (``readonly=True``). A record is valid only when
    its header names its id and its crc32 matches, so a reader never takes a torn write for data.
    Shards are created at full size (sparse) and never grow, so a reader maps each once, on first use.
    Re-putting an id replaces its record: ingestion retried after a crash may reuse ids whose catalog
    rows never committed; the catalog decides which ids are live.
    """

    def __init__(
        self, root: Path, num_frames: int, dim: int, records_per_shard: int = 4096, readonly: bool = False
    ) -> None:
        if num_frames < 1 or dim < 1 or records_per_shard < 1:
            raise ValueError("num_frames, dim and records_per_shard must be positive")
        self.root = Path(root)
        self.num_frames, self.dim, self.records_per_shard = num_frames, dim, records_per_shard
        self.readonly = readonly
        self._tok_bytes = num_frames * dim * 2
        self._payload_bytes = self._tok_bytes + dim * 2
        raw = _REC_HEADER.size + self._payload_bytes
        self._rec_size = -(-raw // _REC_ALIGN) * _REC_ALIGN
        self._file_size = _FILE_HEADER_SIZE + records_per_shard * self._rec_size
        self._shards: dict[int, _Shard] = {}
        self._touched: set[int] = set()
        self._dir_dirty = False
        self._lock = threading.Lock()
        self._closed = False
        self._warned: set[int] = set()  # damaged shards already reported
        if not readonly:
            self.root.mkdir(parents=True, exist_ok=True)
        for n in self._existing_shards():
            self._check_header(self._shard_path(n), n)

    # --- layout -------------------------------------------------------------------------------------
    def _shard_path(self, n: int) -> Path:
        return self.root / f"shard-{n:06d}.tok"

    def _existing_shards(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.stem.split("-")[1]) for p in self.root.glob("shard-*.tok"))

    def _header_bytes(self, n: int) -> bytes:
        fields = (FORMAT_VERSION, self.num_frames, self.dim, self.records_per_shard, self._rec_size, n)
        return _FILE_HEADER.pack(_FILE_MAGIC, *fields).ljust(_FILE_HEADER_SIZE, b"\0")

    def _check_header(self, path: Path, n: int) -> None:
        with open(path, "rb") as f:
            raw = f.read(_FILE_HEADER.size)
        if len(raw) < _FILE_HEADER.size or raw[:8] != _FILE_MAGIC:
            raise StoreLayoutError(f"{path} is not a token store shard (bad file header); move it away")
        _, version, t, d, rps, _, shard_no = _FILE_HEADER.unpack(raw)
        found = (version, t, d, rps, shard_no)
        expected = (FORMAT_VERSION, self.num_frames, self.dim, self.records_per_shard, n)
        if found != expected:
            raise StoreLayoutError(
                f"{path} holds (format, T, D, records_per_shard, shard) = {found}, but this store expects "
                f"{expected}; open it with the same T and D it was written with, or use a separate root per "
                "model id (data/tokens/<model_id>/) and reindex"
            )

    # --- shard access -------------------------------------------------------------------------------
    def _shard(self, n: int, create: bool = False) -> _Shard | None:
        shard = self._shards.get(n)
        if shard is not None:
            return shard
        with self._lock:
            if self._closed:
                raise ValueError(f"token store at {self.root} is closed")
            if n in self._shards:
                return self._shards[n]
            path = self._shard_path(n)
            if not path.exists():
                if not create:
                    return None
                self._create_shard(path, n)
            else:
                self._check_header(path, n)
            fd = os.open(path, os.O_RDONLY if self.readonly else os.O_RDWR)
            try:
                if os.fstat(fd).st_size < self._file_size:
                    if self.readonly:
                        raise StoreLayoutError(
                            f"{path} is truncated; restore it or reindex the segments it held"
                        )
                    # The writer restores the full length: records past the cut read as missing (zeros),
                    # and `indexer verify --repair` re-encodes the videos that had them.
                    logger.warning("%s is truncated; extending it, the records it lost read as missing", path)
                    os.ftruncate(fd, self._file_size)
                    os.fsync(fd)
                mm = mmap.mmap(fd, self._file_size, access=mmap.ACCESS_READ)
            except BaseException:
                os.close(fd)
                raise
            if self.readonly:
                os.close(fd)  # the mapping keeps the file open
            buf = np.frombuffer(mm, dtype=np.uint8)
            shard = self._shards[n] = _Shard(mm, buf, None if self.readonly else fd)
            return shard

    def _create_shard(self, path: Path, n: int) -> None:
        # Build the file under a temp name so a reader never maps a shard without its header.
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, memoryview(self._header_bytes(n)), 0)
            os.ftruncate(fd, self._file_size)  # sparse: unwritten records cost no disk
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        self._dir_dirty = True

    def _record_offset(self, slot: int) -> int:
        return _FILE_HEADER_SIZE + slot * self._rec_size

    # --- writes -------------------------------------------------------------------------------------
    def _require_writable(self) -> None:
        if self.readonly:
            raise PermissionError(
                f"token store at {self.root} was opened readonly; open it with readonly=False"
            )

    def put_many(self, ids: Iterable[int] | np.ndarray, tokens: np.ndarray, cls: np.ndarray) -> None:
        """Write records (tokens [N, T, D], cls [N, D], any float dtype, stored as fp16). Call flush() after."""
        self._require_writable()
        id_arr = _as_ids(ids)
        n, t, d = len(id_arr), self.num_frames, self.dim
        tokens, cls = np.asarray(tokens), np.asarray(cls)
        if tokens.shape != (n, t, d) or cls.shape != (n, d):
            raise ValueError(
                f"expected tokens {(n, t, d)} and cls {(n, d)}, got {tokens.shape} and {cls.shape}"
            )
        if len(np.unique(id_arr)) != n:
            raise ValueError("duplicate segment ids in one put_many call")
        with np.errstate(over="ignore"):  # overflow is reported below, with a clearer message
            tok16, cls16 = tokens.astype(np.float16), cls.astype(np.float16)
        if not (np.isfinite(tok16).all() and np.isfinite(cls16).all()):
            raise ValueError("tokens/cls contain NaN/inf or values beyond the fp16 range (|x| > 65504)")
        order = np.argsort(id_arr, kind="stable")
        id_arr = id_arr[order]
        recs = np.zeros((n, self._rec_size), np.uint8)
        h, tb = _REC_HEADER.size, self._tok_bytes
        recs[:, h : h + tb] = tok16[order].reshape(n, -1).view(np.uint8)
        recs[:, h + tb : h + self._payload_bytes] = cls16[order].view(np.uint8)
        for j, sid in enumerate(id_arr.tolist()):
            crc = zlib.crc32(recs[j, h : h + self._payload_bytes].data)
            _REC_HEADER.pack_into(recs[j], 0, _REC_MAGIC, _FLAG_LIVE, sid, crc)
        for shard_no, first, start, stop in self._runs(id_arr):
            shard = self._shard(shard_no, create=True)
            assert shard is not None and shard.fd is not None
            _pwrite_all(shard.fd, recs[start:stop].data.cast("B"), self._record_offset(first))
            self._touched.add(shard_no)

    def _runs(self, sorted_ids: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
        """(shard, first slot, start, stop) for each run of consecutive ids within one shard."""
        shard_nos, slots = np.divmod(sorted_ids, self.records_per_shard)
        breaks = np.flatnonzero((np.diff(sorted_ids) != 1) | (np.diff(shard_nos) != 0)) + 1
        bounds = [0, *breaks.tolist(), len(sorted_ids)] if len(sorted_ids) else [0]
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            yield int(shard_nos[start]), int(slots[start]), start, stop

    def free(self, ids: Iterable[int] | np.ndarray) -> None:
        """Invalidate records and give their disk blocks back (punch a hole; zero-fill where unsupported)."""
        self._require_writable()
        id_arr = np.unique(_as_ids(ids))
        for shard_no, first, start, stop in self._runs(id_arr):
            shard = self._shard(shard_no)
            if shard is None or shard.fd is None:
                continue
            off, length = self._record_offset(first), (stop - start) * self._rec_size
            if not _punch_hole(shard.fd, off, length):
                _pwrite_all(shard.fd, memoryview(bytes(length)), off)
            self._touched.add(shard_no)

    def flush(self) -> None:
        """Make written and freed records durable; call before committing the catalog rows."""
        self._require_writable()
        for n in sorted(self._touched):
            fd = self._shards[n].fd
            if fd is not None:
                os.fsync(fd)
        self._touched.clear()
        if self._dir_dirty:
            fsync_dir(self.root)
            self._dir_dirty = False

    # --- reads --------------------------------------------------------------------------------------
    def _read(self, ids: Iterable[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, tokens [N, T, D] fp16, cls [N, D] fp16, valid [N] bool); invalid rows hold garbage."""
        id_arr = _as_ids(ids)
        n = len(id_arr)
        tokens = np.empty((n, self.num_frames, self.dim), np.float16)
        cls = np.empty((n, self.dim), np.float16)
        valid = np.zeros(n, bool)
        tok_b, cls_b = tokens.reshape(n, -1).view(np.uint8), cls.view(np.uint8)
        h, tb, pb, rps = _REC_HEADER.size, self._tok_bytes, self._payload_bytes, self.records_per_shard
        for i, sid in enumerate(id_arr.tolist()):
            shard = self._shards.get(sid // rps) or self._readable_shard(sid // rps)
            if shard is None:
                continue
            off = _FILE_HEADER_SIZE + (sid % rps) * self._rec_size
            magic, flags, rec_id, crc = _REC_HEADER.unpack_from(shard.mm, off)
            if magic != _REC_MAGIC or rec_id != sid or not flags & _FLAG_LIVE:
                continue
            # Checksum the copies, not the mapping, so a concurrent rewrite cannot pass as valid.
            tok_b[i] = shard.buf[off + h : off + h + tb]
            cls_b[i] = shard.buf[off + h + tb : off + h + pb]
            valid[i] = zlib.crc32(cls_b[i], zlib.crc32(tok_b[i])) == crc
        return id_arr, tokens, cls, valid

    def _readable_shard(self, n: int) -> _Shard | None:
        # A damaged shard reads as missing records (never as data) instead of failing every read.
        try:
            return self._shard(n)
        except StoreLayoutError as e:
            if n not in self._warned:
                self._warned.add(n)
                logger.warning("%s; its records read as missing until `indexer verify --repair`", e)
            return None

    def damaged_shards(self) -> list[str]:
        """What is wrong with each shard file that is truncated or not of this store (no record is read)."""
        problems = []
        for n in self._existing_shards():
            path = self._shard_path(n)
            try:
                self._check_header(path, n)
                size = path.stat().st_size
            except (StoreLayoutError, OSError) as e:
                problems.append(str(e))
                continue
            if size < self._file_size:
                problems.append(f"{path} is truncated ({size} of {self._file_size} bytes)")
        return problems

    def get(self, ids: Iterable[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [N, T, D], cls [N, D]) as fp16; raises MissingRecordError for ids without a valid record."""
        id_arr, tokens, cls, valid = self._read(ids)
        if not valid.all():
            raise MissingRecordError(id_arr[~valid])
        return tokens, cls

    def get_tokens(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Frame tokens [N, T, D] fp16 in the order of ``ids``."""
        return self.get(ids)[0]

    def get_cls(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """CLS vectors [N, D] fp16 in the order of ``ids``."""
        return self.get(ids)[1]

    def get_cls_checked(self, ids: Iterable[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(valid [N] bool, CLS vectors [N, D] fp16) in one read: ``has`` and ``get_cls`` together, for a
        caller that skips missing records (the rows of invalid ones hold garbage)."""
        _, _, cls, valid = self._read(ids)
        return valid, cls

    def has(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """bool [N]: the id has a record with a valid header and checksum."""
        return self._read(ids)[3]

    def verify(self, ids: Iterable[int] | np.ndarray) -> list[int]:
        """The ids whose record is missing or corrupt."""
        id_arr, _, _, valid = self._read(ids)
        return id_arr[~valid].tolist()

    def iter_records(self, batch_size: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids int64 [n], cls fp16 [n, D]) batches of every valid record, in id order."""
        rps = self.records_per_shard
        for n in self._existing_shards():
            for start in range(n * rps, (n + 1) * rps, batch_size):
                id_arr, _, cls, valid = self._read(np.arange(start, min(start + batch_size, (n + 1) * rps)))
                if valid.any():
                    yield id_arr[valid], cls[valid]

    def close(self) -> None:
        """Unmap shards and close files; pending writes are not fsynced (call flush() first)."""
        with self._lock:
            self._closed = True
            shards, self._shards = self._shards, {}
        for shard in shards.values():
            del shard.buf
            try:
                shard.mm.close()
            except BufferError:  # a caller still holds a view (e.g. a suspended iter_records); GC unmaps it
                logger.debug("shard mapping in %s still referenced at close", self.root)
            if shard.fd is not None:
                os.close(shard.fd)

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
