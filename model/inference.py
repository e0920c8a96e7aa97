"""Inference placement: the best device present and the fastest precision that keeps rankings intact."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from model.tokenbinder import TokenBinder

logger = logging.getLogger(__name__)


@contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """`module` in eval mode for the block, then back in the mode it was in (a training loop's validation)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def best_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16 makes bf16 matmuls several times faster than fp32 on a CPU (PERF-NOTES)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """'auto' -> fp16 on CUDA, bf16 on a CPU with fast bf16, else fp32; or 'fp32' / 'bf16' / 'fp16'."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if precision not in table:
        raise ValueError(f"precision must be one of auto, {', '.join(table)}; got {precision!r}")
    return table[precision]


def prepare_for_inference(
    model: TokenBinder, device: str | torch.device | None = None, precision: str = "auto"
) -> TokenBinder:
    """Move to the device and cast the weights (casting weights, not autocast: autocast re-casts every call)."""
    dev = torch.device(device) if device is not None else best_device()
    dtype = resolve_precision(precision, dev)
    model = model.to(device=dev, dtype=dtype).eval()
    logger.info("model %s on %s in %s", model.model_id, dev, str(dtype).removeprefix("torch."))
    return model
