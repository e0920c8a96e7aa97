"""Writing received bytes (uploads, downloads) to data/incoming while hashing and counting, under a size cap."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from indexer.errors import IndexerError, UserError
from indexer.paths import VIDEO_EXTENSIONS

logger = logging.getLogger(__name__)


class UploadTooLargeError(IndexerError, UserError):
    """The body passed the configured size cap."""

    code = "upload_too_large"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"the file is larger than this server accepts ({limit:,} bytes, TVS_MAX_UPLOAD_BYTES)"
        )


@dataclass
class ReceivedFile:
    path: Path  # under data/incoming, named by us (never by the client)
    sha256: str
    size: int
    filename: str | None  # the client's name, for display only
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def display_name(filename: str | None) -> str | None:
    """The last component of a client-supplied name, stripped of control characters, for display."""
    if not filename:
        return None
    name = PurePath(filename.replace("\\", "/")).name
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return name[:255] or None


def incoming_path(incoming: Path, filename: str | None) -> Path:
    # Only the extension survives from the client's name, and only a known video one.
    suffix = PurePath(display_name(filename) or "").suffix.lower()
    suffix = suffix if suffix in VIDEO_EXTENSIONS else ".bin"
    incoming.mkdir(parents=True, exist_ok=True)
    return incoming / f"upload-{uuid.uuid4().hex}{suffix}"


class FileSink:
    """Writes chunks to a file while hashing and counting; raises UploadTooLargeError past `limit`."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path, self.limit = path, limit
        self.size = 0
        self._hash = hashlib.sha256()
        self._file = open(path, "wb")  # noqa: SIM115 - closed in finish()/abort()

    def write(self, chunk: bytes | memoryview) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise UploadTooLargeError(self.limit)
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self) -> str:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
