"""Video probing, segment windows and frame sampling: the one package the project decodes video through.

This module is the facade the rest of the project imports (`from model.video import probe, read_clip, ...`);
behind it, `decode` opens a file and reads its stream metadata, `sampler` decodes forward once per window
and scales to the model's input size, and `formats` recognises containers by their first bytes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from model.video.decode import StreamMeta, VideoDecodeError, open_video
from model.video.sampler import FrameSampler

logger = logging.getLogger(__name__)

# A last window shorter than this fraction of window_s is merged into the previous one.
MIN_TAIL_FRACTION = 0.2


@dataclass(frozen=True)
class VideoInfo:
    duration_s: float
    fps: float
    num_frames: int
    width: int  # as displayed: after rotation and non-square pixels
    height: int


@dataclass(frozen=True)
class SegmentFrames:
    index: int
    start: float
    end: float
    frames: np.ndarray  # [T, size, size, 3] uint8 RGB
    thumbnail: np.ndarray  # [h, w, 3] uint8 RGB, longest side <= thumb_max_side
    frame_times: np.ndarray  # [T] sampled times in seconds; each frame is the one shown at its time


def probe(path: str | Path) -> VideoInfo:
    """Duration, frame rate, frame count and displayed size; raises VideoDecodeError."""
    container, meta = open_video(path)
    container.close()
    return VideoInfo(meta.duration_s, meta.fps, meta.num_frames, meta.display_width, meta.display_height)


def segment_windows(
    duration_s: float, max_segment_s: float = 30.0, window_s: float = 15.0
) -> list[tuple[float, float]]:
    """Cut [0, duration) into retrieval segments: one if short, else window_s windows."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0 seconds, got {duration_s}; probe the video first")
    if not (max_segment_s > 0 and window_s > 0):
        raise ValueError(f"max_segment_s and window_s must be > 0, got {max_segment_s} and {window_s}")
    if duration_s <= max_segment_s:
        return [(0.0, float(duration_s))]
    count = math.ceil(duration_s / window_s - 1e-9)
    bounds = [i * window_s for i in range(count)] + [float(duration_s)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_TAIL_FRACTION * window_s:
        del bounds[-2]
    return [(float(a), float(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def sample_times(start: float, end: float, num_frames: int) -> np.ndarray:
    """Centres of num_frames equal bins over [start, end), in seconds."""
    if num_frames < 1 or not end > start:
        raise ValueError(f"need num_frames >= 1 and end > start, got {num_frames} over [{start}, {end})")
    return start + (np.arange(num_frames) + 0.5) * ((end - start) / num_frames)


def iter_segment_frames(
    path: str | Path,
    windows: Sequence[tuple[float, float]],
    num_frames: int,
    size: int,
    thumb_max_side: int = 320,
    *,
    decode_threads: int = 0,
) -> Iterator[SegmentFrames]:
    """Each window's frames (short side to size, centre crop) and middle thumbnail, one window at a time.

    decode_threads: 0 lets the decoder use every core on large frames; 1 keeps it on one core, which
    costs the least CPU per frame when other work (the image encoder) runs at the same time.
    """
    if size < 1 or thumb_max_side < 1:
        raise ValueError(f"size and thumb_max_side must be >= 1, got {size} and {thumb_max_side}")
    container, meta = open_video(path, decode_threads)
    try:
        yield from _sample_windows(container, meta, windows, num_frames, size, thumb_max_side)
    finally:
        container.close()


def read_clip(
    path: str | Path,
    num_frames: int,
    size: int,
    start: float | None = None,
    end: float | None = None,
    *,
    decode_threads: int = 0,
) -> np.ndarray:
    """Frames [T, size, size, 3] sampled evenly over [start, end) (default: the whole video)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    container, meta = open_video(path, decode_threads)
    try:
        lo = 0.0 if start is None else max(0.0, float(start))
        hi = meta.duration_s if end is None else min(float(end), meta.duration_s)
        if not hi > lo:
            raise ValueError(f"clip [{start}, {end}) is empty in {path} ({meta.duration_s:.2f} s long)")
        return next(_sample_windows(container, meta, [(lo, hi)], num_frames, size, None)).frames
    finally:
        container.close()


def _sample_windows(
    container: av.container.InputContainer,
    meta: StreamMeta,
    windows: Sequence[tuple[float, float]],
    num_frames: int,
    size: int,
    thumb_max_side: int | None,
) -> Iterator[SegmentFrames]:
    plan = [(float(a), float(b), sample_times(a, b, num_frames)) for a, b in windows]
    scale = size / min(meta.display_width, meta.display_height)
    crop_w = max(size, round(meta.display_width * scale))
    crop_h = max(size, round(meta.display_height * scale))
    thumb_scale = min(1.0, (thumb_max_side or 1) / max(meta.display_width, meta.display_height))
    thumb_w = max(1, round(meta.display_width * thumb_scale))
    thumb_h = max(1, round(meta.display_height * thumb_scale))
    top, left = (crop_h - size) // 2, (crop_w - size) // 2
    sampler = FrameSampler(container, meta)
    middles = [(a + b) / 2 for a, b, _ in plan] if thumb_max_side else []
    sampler.want(np.concatenate([times for _, _, times in plan] + [np.array(middles)]))
    for index, (start, end, times) in enumerate(plan):
        query = np.sort(np.append(times, middles[index])) if thumb_max_side else times
        # The thumbnail's time joins the sample times in one ascending pass over the file.
        found = sampler.frames_at(query)
        by_time = {t: f for t, f in zip(query.tolist(), found, strict=True)}
        frames = np.stack(
            [
                sampler.to_rgb(by_time[t], crop_w, crop_h)[top : top + size, left : left + size]
                for t in times.tolist()
            ]
        )
        if thumb_max_side:
            thumbnail = sampler.to_rgb(by_time[middles[index]], thumb_w, thumb_h)
        else:
            thumbnail = np.zeros((0, 0, 3), np.uint8)
        yield SegmentFrames(index, start, end, frames, thumbnail, times.copy())


__all__ = [
    "SegmentFrames",
    "VideoDecodeError",
    "VideoInfo",
    "iter_segment_frames",
    "probe",
    "read_clip",
    "sample_times",
    "segment_windows",
]
