"""Frame sampling with PyAV: decode forward, seek only when it saves work, skip frames nobody needs."""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterator

import av
import av.video.reformatter
import numpy as np

from model.video.decode import StreamMeta, VideoDecodeError

logger = logging.getLogger(__name__)

# Seeking flushes the decoder (and its threads); it is worth it only when it skips more than this.
SEEK_MARGIN_FRAMES = 8
# With no keyframe index (MPEG-PS, some WebM), continue decoding across gaps shorter than this.
SEEK_GAP_NO_INDEX_S = 8.0
MAX_PACKET_ERRORS = 16
EPS = 1e-6
# Only these demuxers index real keyframes up front; MPEG-PS/TS, for one, flag every entry.
INDEXED_FORMATS = {"mov", "mp4", "matroska", "webm", "avi"}


class FrameSampler:
    """Returns the frames shown at given times, decoding forward and seeking only to skip work."""

    def __init__(self, container: av.container.InputContainer, meta: StreamMeta) -> None:
        self._container = container
        stream = container.streams[meta.stream_index]
        if not isinstance(stream, av.video.stream.VideoStream):
            raise TypeError(f"stream {meta.stream_index} of {container.name} is {stream.type}, not video")
        self._stream = stream
        self._codec = self._stream.codec_context
        self._meta = meta
        self._frame_s = 1.0 / meta.fps
        self._keys = self._keyframe_times(meta.first_frame_s)
        self._frames: Iterator[av.VideoFrame] | None = None  # None: seek before decoding
        self._prev: av.VideoFrame | None = None  # newest frame shown at or before the last target
        self._ahead: av.VideoFrame | None = None  # decoded frame past the last target
        self._wanted: list[float] = []
        self._errors = 0
        self._scalers: dict[tuple[int, int], av.video.reformatter.VideoReformatter] = {}

    def want(self, times: np.ndarray) -> None:
        """Every time that will be asked for; frames near none of them may skip decoding if disposable."""
        self._wanted = sorted(np.asarray(times, dtype=np.float64).tolist())

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
        return (frame.pts or 0) * self._meta.time_base - self._meta.start_s

    def _keyframe_times(self, first_frame_s: float) -> np.ndarray | None:
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
        key = self._keys[max(0, int(np.searchsorted(self._keys, t + EPS, side="right")) - 1)]
        return key > now + SEEK_MARGIN_FRAMES * self._frame_s

    def _seek(self, t: float) -> None:
        pts = math.floor((max(0.0, t) + self._meta.start_s) / self._meta.time_base + EPS)
        try:
            if t <= EPS and self._keys is None:
                # Timestamp seeks in unindexed formats can land a GOP late even at 0; a byte rewind is exact.
                self._container.seek(0, unsupported_byte_offset=True)
            else:
                # By display time: FFmpeg lands on the last keyframe shown at or before t.
                self._container.seek(pts, stream=self._stream, backward=True, any_frame=False)
        except av.error.FFmpegError:
            try:
                self._container.seek(pts, stream=self._stream, backward=True, any_frame=False)
            except av.error.FFmpegError as e:
                raise VideoDecodeError(
                    self._container.name, VideoDecodeError.CORRUPT, f"seek to {t:.2f} s: {e}"
                ) from e
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
                    if self._prev is None and t - back > 0 and back <= 60:
                        # No frame at all after the seek: an unindexed format (MPEG-TS) can land past
                        # the last keyframe. Step back, as for a late landing below.
                        back = max(2 * back, 1.0)
                        self._seek(t - back)
                        continue
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
                i = bisect.bisect_left(self._wanted, p0 - tol)
                needed = i < len(self._wanted) and self._wanted[i] < p1 + tol
                # Disposable (non-reference) frames nobody asked for need not be decoded at all.
                self._codec.skip_frame = "DEFAULT" if needed else "NONREF"
            else:
                self._codec.skip_frame = "DEFAULT"
            try:
                frames = self._stream.decode(packet)
            except av.error.FFmpegError as e:
                self._errors += 1
                if self._errors > MAX_PACKET_ERRORS:
                    raise VideoDecodeError(self._container.name, VideoDecodeError.CORRUPT, str(e)) from e
                logger.debug("skipping a bad packet in %s: %s", self._container.name, e)
                continue
            for frame in frames:
                if frame.pts is not None:
                    yield frame
