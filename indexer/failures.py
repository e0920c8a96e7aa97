"""Why a job or a file failed, in words a person can act on: decode faults, a full or read-only data directory."""

from __future__ import annotations

import errno
from pathlib import Path

from model import video
from model.video import VideoDecodeError

_DISK_FULL = {
    errno.ENOSPC: "is full",
    errno.EDQUOT: "is over its quota",
    errno.EFBIG: "hit a file-size limit",
}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def failure_reason(error: BaseException) -> str:
    """The text a failed job records: the error's own, said plainly when the data directory cannot be written."""
    text = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
        return (
            f"the data directory {_DISK_FULL[error.errno]} ({text}); "
            "free space, then retry the video (`indexer add --retry-failed FILE`)"
        )
    if isinstance(error, OSError) and error.errno in _READ_ONLY:
        return (
            f"the data directory is read-only or not writable ({text}); "
            "fix that, then retry the video (`indexer add --retry-failed FILE`)"
        )
    return text


def not_decodable(path: Path) -> str | None:
    """Why FFmpeg cannot use a file as a video, or None when it can."""
    try:
        video.probe(path)
    except VideoDecodeError as e:
        return skip_reason(e)
    return None


def skip_reason(error: VideoDecodeError) -> str:
    """A short reason for a file FFmpeg rejected, the same for every file with the same fault."""
    if error.reason == VideoDecodeError.NOT_A_VIDEO:
        return f"not a video ({error.detail or 'FFmpeg cannot read it'})"
    if error.reason == VideoDecodeError.NO_VIDEO_STREAM:
        return "no video stream"
    if error.reason in (VideoDecodeError.MISSING, VideoDecodeError.UNREADABLE):
        return f"cannot read: {error.what}"
    return f"cannot decode: {error.what}"
