"""The training loop: AdamW with focus/backbone groups, cosine warm-up, per-epoch validation and checkpoints.

`python -m model.train` (model/train.py) is its command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.calibrate import calibrate_clips
from model.calibration import CALIBRATION_FILE, write_calibration
from model.checkpoint import load_checkpoint, save_checkpoint
from model.data import ClipSet, FrameCache, UniqueVideoBatchSampler, default_cache_dir, prepare_clips
from model.distributed import DistContext, barrier, shard, wrap_model
from model.errors import ModelError, UserError
from model.evaluate import evaluate_clips
from model.tokenbinder import TokenBinder

logger = logging.getLogger(__name__)

MODEL_DIR = "model"  # the latest epoch's checkpoint (config.json + model.safetensors)
STATE_FILE = "train_state.pt"  # optimizer, scheduler, RNG and history: what --resume needs besides weights
SUMMARY_FILE = "train_summary.json"
# Parameters that are embeddings rather than weights: no weight decay (CLIP/open_clip practice).
_NO_DECAY_NAMES = ("embedding", "indicators", "key_pos", "query_pos", "slot_emb", "logit_scale", "logit_bias")
# Knobs that must match for --resume to continue the same run.
_RESUME_KEYS = (
    "batch_size",
    "lr_focus",
    "lr_backbone",
    "weight_decay",
    "warmup_steps",
    "seed",
    "group_key",
    "ground_weight",
)


class ResumeError(ModelError, UserError, RuntimeError):
    """An output folder's saved state cannot be continued with the given settings."""


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64
    lr_focus: float = 1e-4
    lr_backbone: float = 1e-6
    weight_decay: float = 0.2
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    workers: int = 0  # batch-loading worker processes (0: in the training process)
    decode_workers: int = 2
    group_key: str | None = None  # keep samples sharing this meta value in one batch (hard negatives)
    cache_dir: str | None = None
    progress: bool = True
    val_group_key: str | None = None  # report validation t2v R@1 per value of this key (e.g. kind)
    stop_after: int | None = None  # end this run after that many epochs (continue later with resume)
    ground_weight: float = 0.0  # indicator grounding loss (model.losses.grounding_loss); 0: the paper's loss


def param_groups(model: TokenBinder, lr_focus: float, lr_backbone: float, weight_decay: float) -> list[dict]:
    """Focused views + indicators at lr_focus, the open_clip backbone at lr_backbone; no decay on
    norms, biases, embeddings and the logit scale."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "backbone" if name.startswith("clip.") else "focus"
        decay = p.ndim >= 2 and not any(key in name for key in _NO_DECAY_NAMES)
        groups.setdefault((part, decay), []).append(p)
    lrs = {"backbone": lr_backbone, "focus": lr_focus}
    return [
        {"params": ps, "lr": lrs[part], "weight_decay": weight_decay if decay else 0.0, "name": f"{part}"}
        for (part, decay), ps in sorted(groups.items())
    ]


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(
    clips: ClipSet, ids: torch.Tensor, sampler: UniqueVideoBatchSampler, ctx: DistContext, workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(token ids, uint8 frames) for this process's slice of each global batch."""
    mine = [np.asarray(shard(b, ctx)) for b in sampler]

    class _Batches(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(mine)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return ids[mine[i]], torch.from_numpy(clips.frames(clips.clip_index[mine[i]]))

    yield from torch.utils.data.DataLoader(_Batches(), batch_size=None, shuffle=False, num_workers=workers)


def _amp(device: torch.device) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler | None]:
    """CUDA autocast (bf16 where supported, else fp16 with a scaler); fp32 elsewhere (CPU bf16 is not
    reliably faster, and on AVX2-only CPUs it is far slower)."""
    if device.type != "cuda":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


class _Run:
    """Optimizer, schedule and gradient scaler of one run, and their save/restore for --resume."""

    def __init__(
        self, model: TokenBinder, cfg: TrainConfig, steps_per_epoch: int, device: torch.device
    ) -> None:
        self.model, self.cfg = model, cfg
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.lr_focus, cfg.lr_backbone, cfg.weight_decay)
        )
        self.scheduler = cosine_with_warmup(self.optimizer, cfg.warmup_steps, cfg.epochs * steps_per_epoch)
        self.autocast, self.scaler = _amp(device)

    def step(self, net: nn.Module, ids: torch.Tensor, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.autocast:
            losses = net(ids, pixels, ground_weight=self.cfg.ground_weight)
        scaler = self.scaler
        (scaler.scale(losses["loss"]) if scaler else losses["loss"]).backward()
        if scaler:
            scaler.unscale_(self.optimizer)
        grad_norms = self._clip_per_part()
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: v.detach() for k, v in losses.items()}
        out.update({f"grad_norm_{part}": torch.tensor(norm) for part, norm in grad_norms.items()})
        return out

    def _clip_per_part(self) -> dict[str, float]:
        """Clip the backbone's and the focused views' gradients separately, each to grad_clip.

        One global norm lets the contrastive gradients of a from-scratch backbone (norms in the hundreds)
        scale the focused views' gradients, which start tiny behind their zero-initialised last layer,
        down to below AdamW's epsilon: the focused view then never learns."""
        parts: dict[str, list[nn.Parameter]] = {}
        for group in self.optimizer.param_groups:
            parts.setdefault(group["name"], []).extend(p for p in group["params"] if p.grad is not None)
        return {
            name: float(nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
            for name, params in parts.items()
            if params
        }

    def save(self, out: Path, epoch: int, elapsed: float, history: list[dict[str, Any]]) -> None:
        """Weights first, then the state that points at them: a crash in between resumes one epoch early."""
        save_checkpoint(self.model, out / MODEL_DIR)
        state = {
            "epoch": epoch,
            "elapsed": elapsed,
            "history": history,
            "config": dataclasses.asdict(self.cfg),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        torch.save(state, out / (STATE_FILE + ".tmp"))
        os.replace(out / (STATE_FILE + ".tmp"), out / STATE_FILE)

    def restore(self, out: Path) -> tuple[int, float, list[dict[str, Any]]]:
        """(next epoch, seconds trained so far, history) of the run saved in out."""
        from safetensors.torch import load_model

        path = out / STATE_FILE
        if not path.is_file():
            raise ResumeError(f"--resume: {path} not found; start without --resume (or point --out at a run)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved, cfg = state["config"], self.cfg
        changed = {
            k: (saved.get(k), getattr(cfg, k)) for k in _RESUME_KEYS if saved.get(k) != getattr(cfg, k)
        }
        if changed:
            raise ResumeError(
                f"--resume with different settings (saved, given): {changed}; use the saved ones"
            )
        load_model(self.model, str(out / MODEL_DIR / "model.safetensors"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        logger.info("resuming %s after epoch %d", out, state["epoch"] + 1)
        return state["epoch"] + 1, state["elapsed"], state["history"]


def train(
    model: TokenBinder,
    train_clips: ClipSet,
    out_dir: str | os.PathLike[str],
    cfg: TrainConfig,
    val_clips: ClipSet | None = None,
    resume: bool = False,
    ctx: DistContext | None = None,
) -> dict[str, Any]:
    """Train in place; writes out_dir/model (each epoch), out_dir/train_state.pt and train_summary.json."""
    from tqdm import tqdm

    ctx, out = ctx or DistContext(), Path(out_dir)
    torch.manual_seed(cfg.seed)  # the same Gumbel noise on every process: identical global losses
    model.to(ctx.device).train()
    groups = [s.meta.get(cfg.group_key) for s in train_clips.samples] if cfg.group_key else None
    sampler = UniqueVideoBatchSampler(
        train_clips.clip_index, cfg.batch_size, cfg.seed, groups=groups, multiple_of=ctx.world_size
    )
    if len(sampler) == 0:
        raise ValueError(
            f"batch size {cfg.batch_size} exceeds the {len(train_clips.clips)} distinct training videos; "
            "use a smaller --batch-size"
        )
    run = _Run(model, cfg, len(sampler), ctx.device)
    start, elapsed, history = run.restore(out) if resume else (0, 0.0, [])
    if not resume and (out / STATE_FILE).exists():
        raise ResumeError(
            f"{out} already holds a training run; pass --resume to continue it or choose another --out"
        )
    net = wrap_model(model, ctx)
    ids = model.tokenize([s.caption for s in train_clips.samples])
    stop = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start + cfg.stop_after)
    for epoch in range(start, stop):
        sampler.set_epoch(epoch)
        t0, sums, seen = time.perf_counter(), dict[str, float](), 0
        bar = tqdm(
            total=len(sampler),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not (cfg.progress and ctx.is_main),
        )
        for n, (step_ids, frames) in enumerate(_batches(train_clips, ids, sampler, ctx, cfg.workers), 1):
            seen += len(step_ids) * ctx.world_size  # grouped batches may run a few samples short
            pixels = model.preprocess_frames(frames).to(ctx.device, non_blocking=True)
            for k, v in run.step(net, step_ids.to(ctx.device), pixels).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.set_postfix(
                loss=f"{sums['loss'] / n:.3f}",
                clips_s=f"{seen / (time.perf_counter() - t0):.1f}",
            )
            bar.update()
        bar.close()
        seconds = time.perf_counter() - t0
        elapsed += seconds
        record = {
            "epoch": epoch + 1,
            "seconds": round(seconds, 1),
            "clips_per_s": round(seen / seconds, 1),
        }
        record.update({k: round(v / len(sampler), 4) for k, v in sums.items()})
        record["logit_scale"] = round(float(model.logit_scale.detach()), 3)
        if ctx.is_main:
            if val_clips is not None:
                record.update(_validate(model, val_clips, cfg.val_group_key))
            history.append(record)
            logger.info("epoch %d: %s", epoch + 1, json.dumps(record))
            run.save(out, epoch, elapsed, history)
        barrier(ctx)
    model.eval()
    summary = {
        "model_id": load_checkpoint(out / MODEL_DIR).model_id if history else model.model_id,
        "preset": model.config.preset,
        "epochs": cfg.epochs,
        "steps": cfg.epochs * len(sampler),
        "train_samples": len(train_clips.samples),
        "train_videos": len(train_clips.clips),
        "skipped_videos": len(train_clips.failures),
        "world_size": ctx.world_size,
        "device": str(ctx.device),
        "train_seconds": round(elapsed, 1),
        "config": dataclasses.asdict(cfg),
        "history": history,
    }
    if ctx.is_main:
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def calibrate_folders(
    folders: Sequence[Path], val_clips: ClipSet, precision: float, source: str, ctx: DistContext
) -> None:
    """The default score cut-off of each saved checkpoint, measured on its own weights (an fp16 export
    scores a little differently from the fp32 model in memory)."""
    for folder in folders:
        saved = load_checkpoint(folder, ctx.device)
        calibration = calibrate_clips(saved, val_clips, precision, source)
        write_calibration(folder, calibration)
        logger.info(
            "%s: %s",
            folder / CALIBRATION_FILE,
            json.dumps({k: dataclasses.asdict(v) for k, v in calibration.cutoffs.items()}),
        )


def _validate(model: TokenBinder, val_clips: ClipSet, group_key: str | None) -> dict[str, Any]:
    metrics = evaluate_clips(model, val_clips, group_key=group_key)
    record: dict[str, Any] = {}
    for d in ("t2v", "v2t"):
        record[f"val_{d}_R@1"] = {s: metrics[d][s]["R@1"] for s in ("broad", "two_stage")}
    if "by_group" in metrics:
        record["val_t2v_R@1_by_group"] = {s: metrics["by_group"][s] for s in ("broad", "two_stage")}
    return record


def load_clips(samples: list, model: TokenBinder, cfg: TrainConfig, ctx: DistContext) -> ClipSet:
    """Decode into the cache on the main process first, so the others only read it."""
    cache = FrameCache(cfg.cache_dir or default_cache_dir(), model.config.num_frames, model.config.image_size)
    if not ctx.is_main:
        barrier(ctx)
    clips = prepare_clips(samples, cache, workers=cfg.decode_workers, progress=cfg.progress and ctx.is_main)
    if ctx.is_main:
        barrier(ctx)
    return clips
