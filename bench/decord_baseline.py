"""decord's get_batch: the baseline the project's frame sampler is measured and checked against.

Used by bench/decode_sampling.py (speed) and tests/model/test_video_io.py (the sampler returns the frames
decord shows at the same times). Not a decoder of the service: model.video (PyAV) is, chosen by measurement
(docs/BENCHMARKS.md, "Frame sampling").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.video import VideoDecodeError

logger = logging.getLogger(__name__)

# decord's memory grows across get_batch calls on long files (decord issues 197, 208, 373):
# read in bounded batches and start a fresh reader now and then.
DECORD_BATCH = 32
DECORD_BATCHES_PER_READER = 16


def decord_get_batch(
    path: str | Path, times: Sequence[float] | np.ndarray, width: int = -1, height: int = -1
) -> np.ndarray:
    """Frames shown at `times` through decord's get_batch: the baseline the sampler is measured against."""
    import decord  # here, so that importing this module never loads decord's own FFmpeg

    def reader() -> decord.VideoReader:
        try:
            return decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height)
        except decord.DECORDError as e:
            raise VideoDecodeError(path, VideoDecodeError.CORRUPT, f"decord: {e}") from e

    if len(times) == 0:
        return np.empty((0, 0, 0, 3), np.uint8)
    vr = reader()
    starts = vr.get_frame_timestamp(range(len(vr)))[:, 0]
    # len(vr) can count frames that never decode; indices are clamped and a failing batch steps back.
    wanted = np.searchsorted(starts, np.asarray(times, dtype=np.float64) + 1e-6, side="right") - 1
    indices = np.clip(wanted, 0, len(vr) - 1)
    out = []
    for n, lo in enumerate(range(0, len(indices), DECORD_BATCH)):
        if n and n % DECORD_BATCHES_PER_READER == 0:
            vr = reader()
        chunk = indices[lo : lo + DECORD_BATCH].tolist()
        try:
            out.append(vr.get_batch(chunk).asnumpy())
        except decord.DECORDError as e:
            logger.warning("decord could not read frames %s of %s (%s); using earlier ones", chunk, path, e)
            out.append(vr.get_batch([max(0, i - 2) for i in chunk]).asnumpy())
    return np.concatenate(out)
