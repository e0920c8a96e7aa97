"""Index snapshots on disk: atomic save with a sha256 manifest, verified load with one copy in RAM.

The size of faiss's contrib/ondisk.py: file I/O only. A save writes the index and its manifest to temporary
files and renames them (the index rename is the commit point); a load hashes the file by streaming it,
reads it with faiss, and checks that nothing replaced it in between; stale temporaries are cleaned up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import faiss

from indexer.errors import IndexerError
from indexer.paths import fsync_dir

logger = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 2  # 2: IVF indexes hold their segment ids (no IndexIDMap2 around them)
READABLE_FORMATS = (1, 2)  # 1: every index in an IndexIDMap2; VectorIndex.load converts IVF ones
_STALE_TMP_SECONDS = 3600
_READ_ATTEMPTS = 5  # loads that raced a save in another process, read again
_HASH_CHUNK = 1 << 20


class CorruptSnapshotError(IndexerError):
    """A snapshot is missing, truncated or fails its checksum; rebuild the index from the token store."""


class SnapshotNotFoundError(CorruptSnapshotError):
    """No snapshot exists at the path; build the index from the token store."""


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def write_snapshot(index: faiss.Index, path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``path`` and ``path.manifest.json`` (with the file's sha256) atomically; returns the manifest."""
    # The index rename is the commit point: the new manifest is durable beside it before that, so a
    # crash between the two renames is recovered by load(); before it, the old pair is untouched.
    json.dumps(manifest)  # fail on an unserialisable manifest before touching the disk
    path.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_index = path.with_name(f"{path.name}.tmp-{token}")
    tmp_manifest = path.with_name(f"{_manifest_path(path).name}.tmp-{token}")
    committed = False
    try:
        digest = hashlib.sha256()
        with open(tmp_index, "wb") as out:

            def write(chunk: bytes) -> int:
                digest.update(chunk)
                return out.write(chunk)

            faiss.write_index(index, faiss.PyCallbackIOWriter(write))  # type: ignore[attr-defined]
            out.flush()
            os.fsync(out.fileno())
        manifest = {**manifest, "sha256": digest.hexdigest()}
        with open(tmp_manifest, "w") as text:
            json.dump(manifest, text, indent=2, sort_keys=True)
            text.flush()
            os.fsync(text.fileno())
        os.replace(tmp_index, path)
        committed = True
        os.replace(tmp_manifest, _manifest_path(path))
        fsync_dir(path.parent)
    except BaseException:
        tmp_index.unlink(missing_ok=True)
        if not committed:
            tmp_manifest.unlink(missing_ok=True)
        raise
    _remove_stale_tmp(path)
    logger.info("saved index snapshot %s (%d vectors)", path, manifest["count"])
    return manifest


def _remove_stale_tmp(path: Path) -> None:
    # Leftovers of crashed saves; recent ones may belong to a save still running in another process.
    cutoff = time.time() - _STALE_TMP_SECONDS
    for stale in path.parent.glob(f"{path.name}*.tmp-*"):
        try:
            if stale.stat().st_mtime < cutoff:
                stale.unlink()
        except FileNotFoundError:
            pass


def _identity(path: Path) -> tuple[tuple[int, int, int] | None, ...]:
    """Which files the index and its manifest are now: a save replaces both (by rename). The mtime is
    part of it because a new file can get the inode number of the one it replaced."""
    out: list[tuple[int, int, int] | None] = []
    for p in (path, _manifest_path(path)):
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def read_snapshot(path: Path) -> tuple[dict[str, Any], Any]:
    """(manifest, index) whose sha256 agree, retried when another process's save replaced the files
    while they were being read (the index and the manifest then come from two different saves)."""
    for attempt in range(_READ_ATTEMPTS):
        before = _identity(path)
        try:
            return _read_verified_once(path)
        except SnapshotNotFoundError:
            raise
        except CorruptSnapshotError:
            if attempt + 1 == _READ_ATTEMPTS or _identity(path) == before:
                raise
            logger.info("%s was replaced while it was read; reading the new snapshot", path)
    raise AssertionError("unreachable")


def _sha256_file(path: Path) -> str:
    """The file's sha256, streamed: the bytes pass through the page cache, not the process's heap."""
    digest, buf = hashlib.sha256(), bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buf):
            digest.update(view[:size])
    return digest.hexdigest()


def _read_verified_once(path: Path) -> tuple[dict[str, Any], Any]:
    """(manifest, index) whose sha256 agree; the pending manifest of an interrupted save counts.

    The file is hashed by streaming it, then faiss reads it from the file: one copy of the index in RAM,
    not the file's bytes and the index built from them. Saves replace the file by rename, never in place,
    so the same (inode, mtime, size) before the hash and after the read means faiss read the bytes hashed.
    """
    manifest_path = _manifest_path(path)
    if not path.exists() and not manifest_path.exists():
        raise SnapshotNotFoundError(f"no index snapshot at {path}; build the index from the token store")
    before = _identity(path)[0]
    try:
        digest = _sha256_file(path)
    except OSError as e:
        raise CorruptSnapshotError(f"cannot read {path} ({e}); rebuild it from the token store") from e
    manifest = _matching_manifest(path, digest)
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise CorruptSnapshotError(
            f"{path} does not deserialize ({e}); rebuild it from the token store"
        ) from e
    if _identity(path)[0] != before:
        raise CorruptSnapshotError(f"{path} was replaced while it was read")
    return manifest, index


def _matching_manifest(path: Path, digest: str) -> dict[str, Any]:
    """The manifest whose sha256 is ``digest``: the committed one, else an interrupted save's pending one."""
    manifest_path = _manifest_path(path)
    candidates = [manifest_path, *sorted(path.parent.glob(f"{manifest_path.name}.tmp-*"))]
    for candidate in candidates:
        try:
            manifest = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and manifest.get("sha256") == digest:
            if not {"count", "dim", "factory"} <= manifest.keys():
                raise CorruptSnapshotError(f"{candidate} lacks count/dim/factory; rebuild the index")
            if manifest.get("format") not in READABLE_FORMATS:
                raise CorruptSnapshotError(
                    f"{candidate} has format {manifest.get('format')}, expected one of {READABLE_FORMATS}"
                )
            if candidate != manifest_path:
                logger.warning("using %s: the save that wrote %s was interrupted", candidate, path)
            return manifest
    raise CorruptSnapshotError(
        f"{path} is truncated, corrupt or has no matching manifest ({manifest_path}); rebuild it from the token store"
    )
