"""`python -m model.calibrate CHECKPOINT`: measure a model's default score cut-off and store it beside it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from model.calibration import (
    CALIBRATION_FILE,
    DEFAULT_PRECISION,
    Calibration,
    CalibrationError,
    cutoff_for_precision,
    write_calibration,
)
from model.data import ClipSet, FrameCache, default_cache_dir, prepare_clips
from model.evaluate import add_encoding_arguments, add_source_arguments, encode_clipset, read_samples
from model.inference import evaluating
from model.outputs import TextOutput, VideoOutput
from model.tokenbinder import TokenBinder

logger = logging.getLogger(__name__)


@torch.inference_mode()
def top1_scores(
    model: TokenBinder,
    text: TextOutput,
    video: VideoOutput,
    clip_index: np.ndarray,
    top_k: int | None = None,
    batch_size: int = 64,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per score kind: each query's top-1 score over the whole gallery, and whether it is its own clip.

    "two_stage" re-scores the broad view's top-k with the focused view, as the searcher does.
    """
    scores = (text.i1.float() @ video.cls.float().T).numpy()  # [Q, N]
    k = min(top_k or model.config.top_k, scores.shape[1])
    cand = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [Q, k] broad order
    final = np.take_along_axis(scores, cand, 1).copy()
    dev, dtype = model.device, model.dtype
    for start in range(0, len(scores), batch_size):
        rows = np.arange(start, min(start + batch_size, len(scores)))
        out = model.rescore_videos(
            text.indicators[torch.from_numpy(rows)].to(dev, dtype),
            video.frame_tokens[torch.from_numpy(cand[rows])].to(dev, dtype),
        )
        final[rows] += out.delta.float().cpu().numpy()
    best = final.argmax(axis=1)
    two_clip = cand[np.arange(len(cand)), best]
    return {
        "two_stage": (final[np.arange(len(final)), best], two_clip == clip_index),
        "broad": (scores[np.arange(len(scores)), cand[:, 0]], cand[:, 0] == clip_index),
    }


def calibrate_clips(
    model: TokenBinder,
    clips: ClipSet,
    precision: float = DEFAULT_PRECISION,
    validation_set: str = "",
    top_k: int | None = None,
    batch_size: int = 32,
) -> Calibration:
    """The cut-off of every score kind at `precision`, measured on prepared validation clips."""
    if not clips.samples:
        raise CalibrationError("nothing to calibrate on: no validation sample has a decodable video")
    with evaluating(model):
        text, video = encode_clipset(model, clips, batch_size)
        measured = top1_scores(model, text, video, np.asarray(clips.clip_index), top_k)
    return Calibration(
        precision_target=precision,
        cutoffs={kind: cutoff_for_precision(s, ok, precision) for kind, (s, ok) in measured.items()},
        queries=len(clips.samples),
        videos=len(clips.clips),
        model_id=model.model_id,
        top_k=min(top_k or model.config.top_k, len(clips.clips)),
        dtype=str(model.dtype).removeprefix("torch."),
        created_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        validation_set=validation_set,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.calibrate",
        description=(
            "Find the score above which a model's top-1 hit is the right one at a given precision, on a "
            f"validation set, and store it as the checkpoint's {CALIBRATION_FILE} (the service's default "
            "min_score). Both score kinds are measured: two_stage (rerank on) and broad (rerank off)."
        ),
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (config.json + model.safetensors)")
    add_source_arguments(p, "validation JSONL of {video, caption[, start, end]} lines")
    p.add_argument(
        "--precision",
        type=float,
        default=DEFAULT_PRECISION,
        help=f"precision target of the top-1 hit, in (0, 1] (default: {DEFAULT_PRECISION})",
    )
    add_encoding_arguments(p)
    p.add_argument(
        "--describe",
        help=f"how {CALIBRATION_FILE} names the validation set (default: the manifest path or the split)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help=f"print the result, do not write {CALIBRATION_FILE}"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from model.checkpoint import CheckpointError, load_checkpoint
    from model.inference import prepare_for_inference

    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not 0.0 < args.precision <= 1.0:
        parser.error(f"--precision must be in (0, 1], got {args.precision}")
    try:
        # fp32, as model.evaluate: the cut-off is a property of the weights, not of one device's rounding.
        model = prepare_for_inference(load_checkpoint(args.checkpoint), args.device, "fp32")
    except CheckpointError as e:
        parser.error(str(e))
    samples = read_samples(args)
    named = str(args.manifest) if args.manifest is not None else f"MSR-VTT {args.msrvtt_split}"
    source = args.describe or named
    cache = FrameCache(
        args.cache_dir or default_cache_dir(), model.config.num_frames, model.config.image_size
    )
    clips = prepare_clips(samples, cache, workers=args.workers, progress=False)
    try:
        calibration = calibrate_clips(model, clips, args.precision, source, args.top_k, args.batch_size)
    except CalibrationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(calibration), indent=2))
    if not args.dry_run:
        print(f"wrote {write_calibration(args.checkpoint, calibration)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
