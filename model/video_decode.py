"""PyAV decoding internals: open and validate a video, and a sampler that seeks only when seeking saves work."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import av.video.reformatter
import numpy as np

logger = logging.getLogger(__name__)

MAX_SIDE = 16384
MIN_SIDE = 8
MAX_ASPECT = 20.0
# Frame threading pays off only on frames big enough to split the work; tiny clips decode faster alone.
THREADED_MIN_PIXELS = 640 * 360
# Seeking flushes the decoder (and its threads); it is worth it only when it skips more than this.
SEEK_MARGIN_FRAMES = 8
# With no keyframe index (MPEG-PS, some WebM), continue decoding across gaps shorter than this.
SEEK_GAP_NO_INDEX_S = 8.0
MAX_PACKET_ERRORS = 16
EPS = 1e-6
IMAGE_FORMATS = {"image2", "image2pipe"}
INDEXED_FORMATS = {"mov", "mp4", "matroska", "webm", "avi"}
# Container signatures: a file that starts like a video but will not open is damaged, not foreign.
_MAGIC_AT_4 = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
_MAGIC_AT_0 = (b"\x1a\x45\xdf\xa3", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3", b"FLV", b"OggS")


class VideoDecodeError(Exception):
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
            "use a video file (mp4, mkv, webm, mov, avi, mpg)",
        ),
        NO_VIDEO_STREAM: ("it has no video stream (audio only?)", "use a file that contains video"),
        CORRUPT: ("it is truncated or corrupt", "re-encode it or use a complete copy"),
        ZERO_FPS: ("its video stream has no frame rate", "re-encode it with a constant frame rate"),
        BAD_DIMENSIONS: ("its frame size is absurd", "re-encode it at an ordinary resolution"),
    }

    def __init__(self, path: str | Path, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        what, todo = self._TEXT.get(reason, ("it cannot be decoded", "re-encode it"))
        extra = f" ({detail})" if detail else ""
        super().__init__(f"cannot decode {self.path}: {what}{extra}; {todo}")


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


def open_video(path: str | Path) -> tuple[av.container.InputContainer, StreamMeta]:
    """Open a video, check it is usable, and decode its first frame; raises VideoDecodeError."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as fh:
            head = fh.read(16)
    except FileNotFoundError as e:
        raise VideoDecodeError(p, VideoDecodeError.MISSING) from e
    except OSError as e:
        raise VideoDecodeError(p, VideoDecodeError.UNREADABLE, e.strerror or str(e)) from e
    if size == 0:
        raise VideoDecodeError(p, VideoDecodeError.EMPTY)
    try:
        container = av.open(str(p), metadata_errors="ignore")
    except av.error.InvalidDataError as e:
        damaged = head[4:8] in _MAGIC_AT_4 or head.startswith(_MAGIC_AT_0) or head[8:12] == b"AVI "
        reason = VideoDecodeError.CORRUPT if damaged else VideoDecodeError.NOT_A_VIDEO
        raise VideoDecodeError(p, reason, "FFmpeg cannot parse its container") from e
    except (av.error.FFmpegError, OSError) as e:
        raise VideoDecodeError(p, VideoDecodeError.UNREADABLE, str(e)) from e
    try:
        return container, _read_meta(p, container, size)
    except BaseException:
        container.close()
        raise


def _read_meta(p: Path, container: av.container.InputContainer, file_size: int) -> StreamMeta:
    fmt = container.format.name
    if fmt in IMAGE_FORMATS or fmt.endswith("_pipe"):
        raise VideoDecodeError(p, VideoDecodeError.NOT_A_VIDEO, f"it is a still image ({fmt})")
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
    stream.thread_type = "AUTO" if width * height >= THREADED_MIN_PIXELS else "NONE"
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
        for packet in container.demux(container.streams[index]):
            if packet.pts is not None:
                end = max(end, (packet.pts + (packet.duration or 0)) * tb - start_s)
    return end


class FrameSampler:
    """Returns the frames shown at given times, decoding forward and seeking only to skip work."""

    def __init__(self, container: av.container.InputContainer, meta: StreamMeta) -> None:
        self._container = container
        self._stream = container.streams[meta.stream_index]
        self._codec = self._stream.codec_context
        self._meta = meta
        self._frame_s = 1.0 / meta.fps
        self._keys = self._keyframe_times(meta.first_frame_s)
        self._frames: Iterator[av.VideoFrame] | None = None  # None: seek before decoding
        self._prev: av.VideoFrame | None = None  # newest frame shown at or before the last target
        self._ahead: av.VideoFrame | None = None  # decoded frame past the last target
        self._wanted = np.empty(0)
        self._errors = 0
        self._scalers: dict[tuple[int, int], av.video.reformatter.VideoReformatter] = {}

    def want(self, times: np.ndarray) -> None:
        """Every time that will be asked for; frames near none of them may skip decoding if disposable."""
        self._wanted = np.sort(np.asarray(times, dtype=np.float64))

    def frames_at(self, times: np.ndarray) -> list[av.VideoFrame]:
        """The frame shown at each time (times ascending, seconds from the stream start)."""
        out = []
        for t in np.asarray(times, dtype=np.float64).tolist():
            if self._should_seek(t):
                self._seek(t)
            out.append(self._advance(t))
        return out

    def to_rgb(self, frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
        """The frame as displayed, scaled to width x height, as uint8 RGB [height, width, 3]."""
        rotation = self._meta.rotation
        raw_w, raw_h = (height, width) if rotation in (90, 270) else (width, height)
        scaler = self._scalers.setdefault((raw_w, raw_h), av.video.reformatter.VideoReformatter())
        image = scaler.reformat(
            frame, width=raw_w, height=raw_h, format="rgb24", interpolation="BICUBIC", threads=1
        ).to_ndarray()
        return np.ascontiguousarray(np.rot90(image, k=rotation // 90)) if rotation else image

    def time_of(self, frame: av.VideoFrame) -> float:
        return frame.pts * self._meta.time_base - self._meta.start_s

    def _keyframe_times(self, first_frame_s: float) -> np.ndarray | None:
        # Only these demuxers index real keyframes up front; MPEG-PS/TS, for one, flag every entry.
        if not INDEXED_FORMATS & set(self._container.format.name.split(",")):
            return None
        tb, start = self._meta.time_base, self._meta.start_s
        keys = np.array(sorted(e.timestamp for e in self._stream.index_entries if e.is_keyframe), np.float64)
        if not len(keys):
            return None
        # MP4 indexes decode timestamps, which run ahead of display times by the B-frame delay.
        keys = keys * tb - start
        return keys + max(0.0, first_frame_s - keys[0])

    def _should_seek(self, t: float) -> bool:
        if self._frames is None:
            return True
        newest = self._ahead if self._ahead is not None else self._prev
        if newest is None:
            return False
        if self._prev is not None and t < self.time_of(self._prev) - EPS:
            return True
        now = self.time_of(newest)
        if self._keys is None:
            return t - now > SEEK_GAP_NO_INDEX_S
        key = self._keys[max(0, np.searchsorted(self._keys, t + EPS, side="right") - 1)]
        return key > now + SEEK_MARGIN_FRAMES * self._frame_s

    def _seek(self, t: float) -> None:
        if t <= EPS and self._keys is None:
            # Timestamp seeks in unindexed formats can land a GOP late even at 0; a byte rewind is exact.
            self._container.seek(0, unsupported_byte_offset=True)
        else:
            # By display time: FFmpeg lands on the last keyframe shown at or before t.
            pts = math.floor((max(0.0, t) + self._meta.start_s) / self._meta.time_base + EPS)
            self._container.seek(pts, stream=self._stream, backward=True, any_frame=False)
        self._codec.flush_buffers()
        self._frames = self._decode()
        self._prev = self._ahead = None

    def _advance(self, t: float) -> av.VideoFrame:
        back = 0.0
        while True:
            if self._ahead is None:
                assert self._frames is not None
                self._ahead = next(self._frames, None)
                if self._ahead is None:
                    if self._prev is None:
                        raise VideoDecodeError(
                            self._container.name, VideoDecodeError.CORRUPT, f"no frame near {t:.2f} s"
                        )
                    return self._prev  # past the last frame: the last frame is what is shown
            if self.time_of(self._ahead) <= t + EPS:
                self._prev, self._ahead = self._ahead, None
                continue
            if self._prev is not None:
                return self._prev
            # The first frame after a seek is already late: some demuxers (MPEG-PS, AVI) land past
            # the target. Step back further; at the start of the file, the first frame is the answer.
            if t - back <= 0 or back > 60:
                return self._ahead
            back = max(2 * back, 1.0)
            self._seek(t - back)

    def _decode(self) -> Iterator[av.VideoFrame]:
        packets = self._container.demux(self._stream)
        tol = 0.25 * self._frame_s
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError as e:
                logger.warning("stopped reading %s early: %s", self._container.name, e)
                return
            if packet.pts is not None and packet.size:
                p0 = packet.pts * self._meta.time_base - self._meta.start_s
                p1 = p0 + (packet.duration * self._meta.time_base if packet.duration else self._frame_s)
                i = np.searchsorted(self._wanted, p0 - tol)
                needed = i < len(self._wanted) and self._wanted[i] < p1 + tol
                # Disposable (non-reference) frames nobody asked for need not be decoded at all.
                self._codec.skip_frame = "DEFAULT" if needed else "NONREF"
            else:
                self._codec.skip_frame = "DEFAULT"
            try:
                frames = self._codec.decode(packet)
            except av.error.FFmpegError as e:
                self._errors += 1
                if self._errors > MAX_PACKET_ERRORS:
                    raise VideoDecodeError(self._container.name, VideoDecodeError.CORRUPT, str(e)) from e
                logger.debug("skipping a bad packet in %s: %s", self._container.name, e)
                continue
            for frame in frames:
                if frame.pts is not None:
                    yield frame
