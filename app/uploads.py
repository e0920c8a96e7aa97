"""Receiving uploads: multipart bodies streamed to data/incoming while hashing, under a size cap."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from app.errors import AppError, UserError
from indexer.receive import FileSink, ReceivedFile, UploadTooLargeError, display_name, incoming_path

__all__ = ["BadUploadError", "ReceivedFile", "UploadTooLargeError", "receive_multipart", "parse_meta"]

logger = logging.getLogger(__name__)

MAX_FIELD_BYTES = 64 * 1024
FILE_FIELD = "file"
TEXT_FIELDS = ("title", "meta")


class BadUploadError(AppError, UserError, ValueError):
    """The multipart body is malformed or does not hold what POST /videos expects."""

    code = "bad_upload"


class _MultipartReceiver:
    """Feeds python-multipart's push parser; the one `file` part goes to a FileSink, text fields to memory."""

    def __init__(self, boundary: bytes, incoming: Path, limit: int) -> None:
        self.incoming, self.limit = incoming, limit
        self.sink: FileSink | None = None
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self.finished = False
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        self._part: str | None = None
        self._buf = bytearray()
        callbacks: Any = {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._grow("_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._grow("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def _grow(self, name: str, data: bytes) -> None:
        setattr(self, name, getattr(self, name) + data)

    def _part_begin(self) -> None:
        self._headers, self._part, self._buf = {}, None, bytearray()

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name == FILE_FIELD:
            if self.sink is not None:
                raise BadUploadError("send one video per request (the form has more than one `file` part)")
            raw = params.get(b"filename")
            self.filename = display_name(raw.decode("utf-8", "replace")) if raw else None
            self.sink = FileSink(incoming_path(self.incoming, self.filename), self.limit)
        elif name not in TEXT_FIELDS:
            raise BadUploadError(
                f"unexpected form field {name!r}; POST /videos takes `file`, and optionally `title` and `meta`"
            )
        self._part = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == FILE_FIELD:
            assert self.sink is not None
            self.sink.write(memoryview(data)[start:end])
        else:
            self._buf += data[start:end]
            if len(self._buf) > MAX_FIELD_BYTES:
                raise BadUploadError(f"form field {self._part!r} is longer than {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if self._part in TEXT_FIELDS:
            try:
                self.fields[self._part] = self._buf.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadUploadError(f"form field {self._part!r} is not UTF-8 text (byte {e.start})") from e

    def _end(self) -> None:
        self.finished = True

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError as e:
            raise BadUploadError(f"the multipart body is malformed: {e}") from e

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()


def multipart_boundary(content_type: str) -> bytes:
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise BadUploadError("expected multipart/form-data with a boundary")
    return boundary


async def receive_multipart(
    chunks: AsyncIterator[bytes], content_type: str, incoming: Path, limit: int
) -> ReceivedFile:
    """Stream a multipart body to disk chunk by chunk; parsing and writing run in the thread pool."""
    receiver = _MultipartReceiver(multipart_boundary(content_type), incoming, limit)
    try:
        async for chunk in chunks:
            if chunk:
                await run_in_threadpool(receiver.feed, chunk)
        if not receiver.finished:
            raise BadUploadError("the multipart body ended early (the upload was cut off?)")
        if receiver.sink is None:
            raise BadUploadError("no `file` part: send the video as a form field named `file`")
        if receiver.sink.size == 0:
            raise BadUploadError("the uploaded file is empty")
        digest = await run_in_threadpool(receiver.sink.finish)
    except BaseException:
        await run_in_threadpool(receiver.abort)
        raise
    return ReceivedFile(receiver.sink.path, digest, receiver.sink.size, receiver.filename, receiver.fields)


def parse_meta(text: str | None) -> dict[str, Any] | None:
    """The `meta` form field: a JSON object."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise BadUploadError(f"`meta` must be a JSON object: {e}") from e
    if not isinstance(value, dict):
        raise BadUploadError('`meta` must be a JSON object, like {"camera": "front door"}')
    return value
