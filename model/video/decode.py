"""Opening a video with PyAV: validation with plain-words errors, and the stream facts sampling needs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import av

from model.errors import ModelError
from model.video.formats import HEAD_BYTES, sniff

logger = logging.getLogger(__name__)

MAX_SIDE = 16384
MIN_SIDE = 8
MAX_ASPECT = 20.0
# Frame threading pays off only on frames big enough to split the work; tiny clips decode faster alone.
THREADED_MIN_PIXELS = 640 * 360
IMAGE_FORMATS = {"image2", "image2pipe"}
# FFmpeg renders these text files (ANSI art, chosen by suffix: .bin, .txt, .nfo...) as "video": never a video.
TEXT_ART_FORMATS = {"bin", "tty", "adf", "idf", "xbin"}


class VideoDecodeError(ModelError):
    """A file that cannot be used as a video; `.reason` is one of the class constants below."""

    MISSING = "missing"
    UNREADABLE = "unreadable"
    EMPTY = "empty"
    NOT_A_VIDEO = "not_a_video"
    NO_VIDEO_STREAM = "no_video_stream"
    CORRUPT = "corrupt"
    ZERO_FPS = "zero_fps"
    BAD_DIMENSIONS = "bad_dimensions"

    _TEXT = {
        MISSING: ("the file does not exist", "check the path"),
        UNREADABLE: ("the file cannot be read", "check its permissions and the disk"),
        EMPTY: ("the file is empty (0 bytes)", "copy or upload it again"),
        NOT_A_VIDEO: (
            "it is not a video in a known format",
            "use a video file (mp4, mkv, webm, mov, avi, mpg, ts, m2ts, 3gp, wmv, flv, mxf…)",
        ),
        NO_VIDEO_STREAM: ("it has no video stream (audio only?)", "use a file that contains video"),
        CORRUPT: ("it is truncated or corrupt", "re-encode it or use a complete copy"),
        ZERO_FPS: ("its video stream has no frame rate", "re-encode it with a constant frame rate"),
        BAD_DIMENSIONS: ("its frame size is absurd", "re-encode it at an ordinary resolution"),
    }

    def __init__(self, path: str | Path, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        what, todo = self._TEXT.get(reason, ("it cannot be decoded", "re-encode it"))
        extra = f" ({detail})" if detail else ""
        super().__init__(f"cannot decode {self.path}: {what}{extra}; {todo}")

    @property
    def what(self) -> str:
        """What is wrong, in a few words without the path ("it is truncated or corrupt")."""
        return self._TEXT.get(self.reason, ("it cannot be decoded", ""))[0]


@dataclass(frozen=True)
class StreamMeta:
    duration_s: float
    fps: float
    num_frames: int
    display_width: int
    display_height: int
    rotation: int  # counter-clockwise degrees to apply to decoded frames: 0, 90, 180 or 270
    time_base: float
    start_s: float  # stream start time; frame times are reported relative to it
    stream_index: int
    first_frame_s: float


def open_video(path: str | Path, threads: int = 0) -> tuple[av.container.InputContainer, StreamMeta]:
    """Open a video, check it is usable, and decode its first frame; raises VideoDecodeError.

    threads: decoder threads; 0 picks frame threading for frames of 640x360 and up, 1 decodes on
    one core (the least CPU per frame, best when other work runs beside it).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as fh:
            head = fh.read(HEAD_BYTES)
    except FileNotFoundError as e:
        raise VideoDecodeError(p, VideoDecodeError.MISSING) from e
    except OSError as e:
        raise VideoDecodeError(p, VideoDecodeError.UNREADABLE, e.strerror or str(e)) from e
    if size == 0:
        raise VideoDecodeError(p, VideoDecodeError.EMPTY)
    try:
        container = av.open(str(p), metadata_errors="ignore")
    except av.error.InvalidDataError as e:
        # A file that starts like a video container but will not open is damaged, not foreign.
        damaged = sniff(head).format is not None
        reason = VideoDecodeError.CORRUPT if damaged else VideoDecodeError.NOT_A_VIDEO
        raise VideoDecodeError(p, reason, "FFmpeg cannot parse its container") from e
    except (av.error.FFmpegError, OSError) as e:
        raise VideoDecodeError(p, VideoDecodeError.UNREADABLE, str(e)) from e
    try:
        return container, _read_meta(p, container, size, threads)
    except BaseException:
        container.close()
        raise


def _read_meta(p: Path, container: av.container.InputContainer, file_size: int, threads: int) -> StreamMeta:
    fmt = container.format.name
    if fmt in IMAGE_FORMATS or fmt.endswith("_pipe"):
        raise VideoDecodeError(p, VideoDecodeError.NOT_A_VIDEO, f"it is a still image ({fmt})")
    if fmt in TEXT_ART_FORMATS:
        raise VideoDecodeError(p, VideoDecodeError.NOT_A_VIDEO, f"FFmpeg can show it only as text art: {fmt}")
    attached = av.stream.Disposition.attached_pic
    streams = [s for s in container.streams.video if not s.disposition & attached]
    if not streams:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        raise VideoDecodeError(p, VideoDecodeError.NO_VIDEO_STREAM, f"streams: {kinds}")
    stream = streams[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if not (MIN_SIDE <= min(width, height) and max(width, height) <= MAX_SIDE) or (
        max(width, height) > MAX_ASPECT * min(width, height)
    ):
        raise VideoDecodeError(p, VideoDecodeError.BAD_DIMENSIONS, f"{width}x{height}")
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if not 0 < fps < 10_000:
        raise VideoDecodeError(p, VideoDecodeError.ZERO_FPS, f"reported {rate}")
    tb = float(stream.time_base) if stream.time_base else 1.0 / 90_000
    start_s = stream.start_time * tb if stream.start_time is not None else 0.0
    if stream.duration:
        duration = stream.duration * tb
    elif container.duration:
        duration = container.duration / av.time_base - max(
            0.0, start_s - (container.start_time or 0) / av.time_base
        )
    else:
        duration = _scan_duration(p, stream.index, tb, start_s)
    entries = stream.index_entries
    if len(entries) and entries[len(entries) - 1].pos + entries[len(entries) - 1].size > file_size:
        last = entries[len(entries) - 1]
        raise VideoDecodeError(
            p, VideoDecodeError.CORRUPT, f"data ends at byte {file_size}, index needs {last.pos + last.size}"
        )
    # Threading must be chosen before the first decode opens the codec.
    if threads == 0:
        stream.thread_type = "AUTO" if width * height >= THREADED_MIN_PIXELS else "NONE"
    else:
        stream.thread_type = "AUTO" if threads > 1 else "NONE"
        stream.thread_count = threads
    try:
        first = next(container.decode(stream), None)
    except av.error.FFmpegError as e:
        raise VideoDecodeError(p, VideoDecodeError.CORRUPT, f"first frame: {e}") from e
    if first is None or not duration > 0:
        raise VideoDecodeError(p, VideoDecodeError.CORRUPT, "no frame could be decoded")
    rotation = int(round(first.rotation / 90.0)) % 4 * 90
    sar = stream.sample_aspect_ratio
    disp_w = max(1, round(width * float(sar))) if sar and sar > 0 else width
    disp_w, disp_h = (height, disp_w) if rotation in (90, 270) else (disp_w, height)
    num_frames = stream.frames if stream.frames > 0 else max(1, round(duration * fps))
    return StreamMeta(
        float(duration),
        fps,
        int(num_frames),
        disp_w,
        disp_h,
        rotation,
        tb,
        float(start_s),
        stream.index,
        first.pts * tb - start_s if first.pts is not None else 0.0,
    )


def _scan_duration(p: Path, index: int, tb: float, start_s: float) -> float:
    """Duration from the last packet, for files whose header has none (e.g. browser-recorded WebM)."""
    end = 0.0
    with av.open(str(p), metadata_errors="ignore") as container:
        try:
            for packet in container.demux(container.streams[index]):
                if packet.pts is not None:
                    end = max(end, (packet.pts + (packet.duration or 0)) * tb - start_s)
        except av.error.FFmpegError as e:
            if not end > 0:
                raise VideoDecodeError(p, VideoDecodeError.CORRUPT, f"no packet could be read: {e}") from e
            logger.warning("%s: duration from the packets before a damaged one (%s)", p, e)
    return end
