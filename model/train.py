"""`python -m model.train`: fine-tune TokenBinder on a manifest or MSR-VTT (the loop is model/training.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from model.calibration import CALIBRATION_FILE, DEFAULT_PRECISION
from model.checkpoint import save_checkpoint
from model.data import default_cache_dir
from model.tokenbinder import TokenBinder
from model.training import (
    MODEL_DIR,
    TrainConfig,
    calibrate_folders,
    load_clips,
    train,
)

logger = logging.getLogger(__name__)

_KNOBS = {  # TrainConfig field -> help (the default is appended)
    "epochs": "training epochs",
    "batch_size": "global batch, split evenly over processes",
    "lr_focus": "learning rate of the focused views and indicators",
    "lr_backbone": "learning rate of the open_clip backbone (from scratch: ~5e-4)",
    "weight_decay": "AdamW weight decay (not on norms, biases, embeddings)",
    "warmup_steps": "linear warm-up steps before the cosine decay",
    "grad_clip": "max gradient norm",
    "seed": "data order and Gumbel noise",
    "workers": "batch-loading processes",
    "decode_workers": "decoding threads",
    "stop_after": "end this run after N epochs (continue with --resume)",
    "ground_weight": "weight of the indicator grounding loss, ours (0: the paper's loss; 1 for a "
    "from-scratch text tower, see docs/architecture.md)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.train",
        description="Train TokenBinder on a JSONL manifest or MSR-VTT. Under torchrun, trains data-parallel "
        "(gloo on CPU, nccl on CUDA) with contrastive negatives and in-batch top-k spanning every process.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path, help="training JSONL: {video, caption[, start, end]} per line")
    src.add_argument(
        "--msrvtt-dir", type=Path, help="folder with MSR-VTT's annotation files (split train-9k)"
    )
    p.add_argument("--msrvtt-videos", type=Path, help="folder of videoNNNN.mp4 (default: MSRVTT_DIR/videos)")
    p.add_argument("--val-manifest", type=Path, help="validation JSONL (broad and two-stage R@1 each epoch)")
    p.add_argument("--preset", help="architecture to train from scratch: tiny, small, ViT-B-32, ViT-B-16")
    p.add_argument("--init", help="start from a checkpoint directory or PRESET:PRETRAINED (ViT-B-32:openai)")
    p.add_argument("--out", type=Path, required=True, help="output folder (checkpoint, state, summary)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    defaults = TrainConfig()
    for name, text in _KNOBS.items():
        value = getattr(defaults, name)
        kind = int if name in ("stop_after",) else type(value)
        p.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=value, help=f"{text} (default: {value})"
        )
    p.add_argument(
        "--group-key", help="manifest key whose samples share a batch (hard negatives), e.g. family"
    )
    p.add_argument("--val-group-key", help="report validation t2v R@1 per value of this key, e.g. kind")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice; 1 can be faster on a busy machine)",
    )
    p.add_argument(
        "--focus-head",
        choices=("candidate", "slot"),
        help="focused-view head of a new model: candidate (default; one head shared by all candidates) or "
        "slot (the first design, k per-slot outputs; for comparison), see docs/architecture.md",
    )
    p.add_argument("--cache-dir", type=Path, help=f"decoded-frame cache (default: {default_cache_dir()})")
    p.add_argument("--export", type=Path, help="also write the final model here (e.g. a release folder)")
    p.add_argument(
        "--export-dtype", choices=("fp32", "fp16"), default="fp32", help="weights dtype of --export"
    )
    p.add_argument(
        "--calibrate-precision",
        type=float,
        default=DEFAULT_PRECISION,
        help="with --val-manifest: store the score cut-off at this top-1 precision on the validation set "
        f"beside the final model ({CALIBRATION_FILE}, as `python -m model.calibrate`; "
        f"default: {DEFAULT_PRECISION}; 0: do not calibrate)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _initial_model(preset: str | None, init: str | None, focus_head: str | None = None) -> TokenBinder:
    from model.checkpoint import build_model, load_model
    from model.config import preset_config

    overrides = {"focus_head": focus_head} if focus_head else {}
    if init is None:
        if preset is None:
            raise SystemExit(
                "give --preset (train from scratch) or --init (a checkpoint or PRESET:PRETRAINED)"
            )
        return build_model(preset_config(preset, **overrides))
    spec = Path(init).expanduser()
    if focus_head and spec.is_dir():
        raise SystemExit("--focus-head applies to a new model; a checkpoint keeps the focused view it has")
    if focus_head:  # PRESET:PRETRAINED: the backbone's weights, a new focused view of the asked kind
        name, _, pretrained = init.partition(":")
        model = build_model(preset_config(name, pretrained=pretrained or None, **overrides))
    else:
        model = load_model(init)
    if preset is not None and model.config.preset != preset:
        raise SystemExit(f"--init {init} is a {model.config.preset!r} model but --preset says {preset!r}")
    return model


def main(argv: Sequence[str] | None = None) -> int:
    from model.distributed import init_distributed, shutdown
    from model.manifest import read_manifest, read_msrvtt

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig(
        **{name: getattr(args, name) for name in _KNOBS},
        group_key=args.group_key,
        val_group_key=args.val_group_key,
        cache_dir=str(args.cache_dir) if args.cache_dir else None,
        progress=not args.no_progress,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _initial_model(args.preset, args.init, args.focus_head)
    if args.manifest is not None:
        samples = read_manifest(args.manifest)
    else:
        samples = read_msrvtt(args.msrvtt_dir, "train-9k", args.msrvtt_videos)
    ctx = init_distributed()
    try:
        train_clips = load_clips(samples, model, cfg, ctx)
        val_clips = (
            load_clips(read_manifest(args.val_manifest), model, cfg, ctx) if args.val_manifest else None
        )
        summary = train(model, train_clips, args.out, cfg, val_clips, args.resume, ctx)
        if ctx.is_main:
            if args.export is not None:
                save_checkpoint(
                    model, args.export, dtype=torch.float16 if args.export_dtype == "fp16" else None
                )
            if val_clips is not None and args.calibrate_precision > 0:
                folders = [args.out / MODEL_DIR] + ([args.export] if args.export is not None else [])
                calibrate_folders(folders, val_clips, args.calibrate_precision, str(args.val_manifest), ctx)
            print(json.dumps({k: summary[k] for k in ("model_id", "steps", "train_seconds")}))
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
