"""Retrieval evaluation: broad view and two-stage R@1/5/10, MdR, MnR for text->video and video->text."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.data import ClipSet, FrameCache, default_cache_dir, prepare_clips
from model.inference import evaluating
from model.manifest import Sample
from model.metrics import group_r1, retrieval_report, slot_spread, two_stage_ranks
from model.outputs import TextOutput, VideoOutput
from model.tokenbinder import TokenBinder

logger = logging.getLogger(__name__)


@torch.inference_mode()
def encode_clipset(
    model: TokenBinder, clips: ClipSet, batch_size: int = 32
) -> tuple[TextOutput, VideoOutput]:
    """Every caption (TextOutput over samples) and every distinct clip (VideoOutput over clips), on the CPU."""
    texts, videos = [], []
    captions = [s.caption for s in clips.samples]
    for i in range(0, len(captions), 8 * batch_size):
        texts.append(model.encode_text(model.tokenize(captions[i : i + 8 * batch_size]).to(model.device)))
    for i in range(0, len(clips.clips), batch_size):
        frames = model.preprocess_frames(clips.frames(np.arange(i, min(i + batch_size, len(clips.clips)))))
        videos.append(model.encode_frames(frames))
    text = TextOutput(torch.cat([t.i1 for t in texts]).cpu(), torch.cat([t.indicators for t in texts]).cpu())
    video = VideoOutput(
        torch.cat([v.frame_tokens for v in videos]).cpu(), torch.cat([v.cls for v in videos]).cpu()
    )
    return text, video


def retrieval_metrics(
    model: TokenBinder,
    text: TextOutput,
    video: VideoOutput,
    clip_index: np.ndarray,
    top_k: int | None = None,
    groups: Sequence[str] | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Both directions, both stages; the focused views re-score each query's top-k broad candidates."""
    k = top_k or model.config.top_k
    scores = (text.i1 @ video.cls.T).numpy()  # [Q, N] broad view S'
    truth = np.zeros(scores.shape, dtype=bool)
    truth[np.arange(len(clip_index)), clip_index] = True
    dev = model.device

    @torch.inference_mode()
    def rescore_videos(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        q = text.indicators[torch.from_numpy(rows)].to(dev)  # [B, m-1, D]
        cands = video.frame_tokens[torch.from_numpy(cols)].to(dev)  # [B, k, T, D]
        return model.rescore_videos(q, cands).delta.cpu().numpy()

    @torch.inference_mode()
    def rescore_texts(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        frames = video.frame_tokens[torch.from_numpy(rows)].to(dev)  # [B, T, D]
        cands = text.indicators[torch.from_numpy(cols)].to(dev)  # [B, k, m-1, D]
        return model.rescore_texts(frames, cands).delta.cpu().numpy()

    kk = min(k, scores.shape[1])
    deltas_t = np.zeros((scores.shape[0], kk))
    deltas_v = np.zeros((scores.shape[1], kk))
    t2v = two_stage_ranks(scores, truth, k, rescore_videos, batch_size=batch_size, deltas_out=deltas_t)
    v2t = two_stage_ranks(scores.T, truth.T, k, rescore_texts, batch_size=batch_size, deltas_out=deltas_v)
    out: dict[str, Any] = {
        "t2v": {**retrieval_report(*t2v), "delta_by_slot": slot_spread(deltas_t)},
        "v2t": {**retrieval_report(*v2t), "delta_by_slot": slot_spread(deltas_v)},
        "n_queries": int(scores.shape[0]),
        "n_videos": int(scores.shape[1]),
        "model_id": model.model_id,
        "top_k": int(min(k, scores.shape[1])),
    }
    if groups is not None:
        out["by_group"] = {"broad": group_r1(t2v[0], groups), "two_stage": group_r1(t2v[1], groups)}
    return out


def evaluate_clips(
    model: TokenBinder,
    clips: ClipSet,
    top_k: int | None = None,
    group_key: str | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Metrics over prepared clips (the training loop's per-epoch validation calls this)."""
    if not clips.samples:
        raise ValueError("nothing to evaluate: no sample has a decodable video")
    with evaluating(model):
        text, video = encode_clipset(model, clips, batch_size)
        groups = None
        if group_key is not None:
            groups = [str(s.meta.get(group_key, "(none)")) for s in clips.samples]
        out = retrieval_metrics(model, text, video, clips.clip_index, top_k, groups)
    if group_key is not None:
        out["by_group"] = {"key": group_key, **out["by_group"]}
    out["skipped_videos"] = len(clips.failures)
    return out


def evaluate(
    model: TokenBinder,
    samples: Sequence[Sample],
    cache_dir: str | Path | None = None,
    workers: int = 2,
    top_k: int | None = None,
    group_key: str | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Decode (through the frame cache), encode and score: the metrics dict written by the CLI."""
    cache = FrameCache(cache_dir or default_cache_dir(), model.config.num_frames, model.config.image_size)
    clips = prepare_clips(samples, cache, workers=workers, progress=progress)
    return evaluate_clips(model, clips, top_k, group_key, batch_size)


def format_table(metrics: dict[str, Any]) -> str:
    """A markdown table of the metrics (and R@1 per group when present)."""
    keys = ["R@1", "R@5", "R@10", "MdR", "MnR"]
    lines = [
        f"{metrics['n_queries']} queries, {metrics['n_videos']} videos, top_k {metrics['top_k']}, "
        f"model {metrics['model_id']}",
        "",
        "| direction | stage | " + " | ".join(keys) + " |",
        "|---|---|" + "---:|" * len(keys),
    ]
    for direction in ("t2v", "v2t"):
        for stage in ("broad", "two_stage"):
            row = metrics[direction][stage]
            lines.append(f"| {direction} | {stage} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")
    lines += [
        "",
        "| focused view's corrections | spread within a slot | between slots | verdict |",
        "|---|---:|---:|---|",
    ]
    for direction in ("t2v", "v2t"):
        spread = metrics[direction].get("delta_by_slot")
        if spread:
            lines.append(
                f"| {direction} | {spread['within']:.4f} | {spread['between']:.4f} | {spread['verdict']} |"
            )
    if "by_group" in metrics:
        g = metrics["by_group"]
        lines += ["", f"| t2v R@1 by {g['key']} | broad | two_stage |", "|---|---:|---:|"]
        lines += [f"| {name} | {g['broad'][name]:.1f} | {g['two_stage'][name]:.1f} |" for name in g["broad"]]
    return "\n".join(lines)


def add_source_arguments(p: argparse.ArgumentParser, manifest_help: str) -> None:
    """Where the captions and clips come from: a manifest or MSR-VTT's release (model.evaluate, model.calibrate)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path, help=manifest_help)
    src.add_argument("--msrvtt-dir", type=Path, help="folder with MSR-VTT's annotation files")
    p.add_argument("--msrvtt-split", default="test-1k-A", help="MSR-VTT split (default: test-1k-A)")
    p.add_argument("--msrvtt-videos", type=Path, help="folder of videoNNNN.mp4 (default: MSRVTT_DIR/videos)")


def add_encoding_arguments(p: argparse.ArgumentParser) -> None:
    """How the clips are decoded and encoded, and how many candidates the focused view re-scores."""
    p.add_argument(
        "--top-k", type=int, help="candidates re-scored by the focused view (default: the model's)"
    )
    p.add_argument("--cache-dir", type=Path, help=f"decoded-frame cache (default: {default_cache_dir()})")
    p.add_argument("--workers", type=int, default=2, help="decoding threads (default: 2)")
    p.add_argument("--batch-size", type=int, default=32, help="clips per encoder batch (default: 32)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA if present)")


def read_samples(args: argparse.Namespace) -> list[Sample]:
    """The samples `add_source_arguments`' flags name."""
    from model.manifest import read_manifest, read_msrvtt

    if args.manifest is not None:
        return read_manifest(args.manifest)
    return read_msrvtt(args.msrvtt_dir, args.msrvtt_split, args.msrvtt_videos)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.evaluate",
        description="Text-video retrieval metrics of a TokenBinder model, broad view and two-stage.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, preset, or PRESET:PRETRAINED")
    add_source_arguments(p, "JSONL manifest of {video, caption[, start, end]} lines")
    p.add_argument("--out", type=Path, help="write the metrics JSON here")
    p.add_argument("--group-key", help="manifest key to report t2v R@1 per value of (e.g. kind)")
    add_encoding_arguments(p)
    p.add_argument(
        "--precision", default="fp32", help="fp32 (default), bf16, fp16 or auto (model.inference's pick)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from model.checkpoint import load_model
    from model.inference import prepare_for_inference

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    samples = read_samples(args)
    model = prepare_for_inference(load_model(args.checkpoint), args.device, args.precision)
    metrics = evaluate(
        model, samples, args.cache_dir, args.workers, args.top_k, args.group_key, args.batch_size
    )
    print(format_table(metrics))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
