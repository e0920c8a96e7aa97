"""Data-parallel training under torchrun: process group, DDP wrapping, an all-gather that keeps gradients."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from model.errors import ModelError, UserError
from model.tokenbinder import TokenBinder

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DistributedSetupError(ModelError, UserError, RuntimeError):
    """The torchrun environment is incomplete or the process group cannot be formed."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | torch.device | None = None) -> DistContext:
    """One process of a torchrun job (env RANK/WORLD_SIZE/LOCAL_RANK): nccl on CUDA, gloo on the CPU.

    Outside torchrun this returns a single-process context on `device` (default: CUDA if present).
    """
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if not launched_by_torchrun():
        dev = torch.device(device) if device is not None else torch.device("cuda" if cuda else "cpu")
        return DistContext(device=dev)
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise DistributedSetupError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {e}") from e
    if cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    init_process_group("nccl" if cuda else "gloo", rank, world)
    return DistContext(rank, world, local_rank, dev)


def init_process_group(backend: str, rank: int, world_size: int, init_method: str | None = None) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group(
            backend, init_method=init_method or "env://", rank=rank, world_size=world_size
        )
    except (RuntimeError, ValueError) as e:
        raise DistributedSetupError(
            f"cannot join the {backend} process group as rank {rank} of {world_size}: {e}; "
            "launch with torchrun (it sets MASTER_ADDR/MASTER_PORT) and check that every process can reach it"
        ) from e


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every process along dim 0, in rank order; gradients flow back to each origin.

    The backward sums each slice's gradients over processes; DistributedDataParallel then averages over the
    same processes, so the parameters end up with exactly the single-process gradient of the global batch.
    """
    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():
        # Deprecated in favour of a private functional-collectives API; this one is public and still exact.
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_fn.all_gather(x)
    return torch.cat(parts, dim=0)


def wrap_model(model: TokenBinder, ctx: DistContext) -> nn.Module:
    """DDP around the model when distributed (with the gather hook set), else the model itself."""
    if not ctx.enabled:
        model.gather = None
        return model
    model.gather = all_gather_with_grad
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shard(batch: Sequence[T], ctx: DistContext) -> Sequence[T]:
    """This process's contiguous slice of a global batch (rank order matches all_gather's)."""
    if len(batch) % ctx.world_size:
        raise ValueError(
            f"global batch of {len(batch)} does not split evenly over {ctx.world_size} processes; "
            "choose a batch size divisible by the number of processes"
        )
    per = len(batch) // ctx.world_size
    return batch[ctx.rank * per : (ctx.rank + 1) * per]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: T, ctx: DistContext) -> T:
    """rank 0's value of obj on every process."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
