"""Where the FAISS broad-view index lives: `auto`, `cpu`, `cuda` or `cuda:N`, resolved once at start-up."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from indexer.errors import IndexerError, UserError
from indexer.faiss_parts import gpu_unavailable_reason

logger = logging.getLogger(__name__)

_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


class IndexDeviceError(IndexerError, UserError, ValueError):
    """The index device asked for is malformed, or is a GPU that faiss cannot use here."""


@dataclass(frozen=True)
class IndexPlacement:
    """The GPU to clone the index to (None: the CPU), and why the CPU when it is the CPU."""

    gpu: int | None
    reason: str = ""


def check_index_device(spec: str) -> str:
    """The spec, normalised; IndexDeviceError unless it is auto, cpu, cuda or cuda:N."""
    value = spec.strip().lower()
    if not _SPEC.fullmatch(value):
        raise IndexDeviceError(f"index device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    return value


def resolve_index_device(spec: str) -> IndexPlacement:
    """`auto`: GPU 0 when faiss has GPU support and sees a device, else the CPU (with the reason); `cpu`: the
    CPU; `cuda`/`cuda:N`: that GPU, or IndexDeviceError saying why it cannot be used."""
    value = check_index_device(spec)
    if value == "cpu":
        return IndexPlacement(None, "the index device is set to cpu")
    device = int(value.partition(":")[2] or 0)
    reason = gpu_unavailable_reason(device)
    if reason is None:
        return IndexPlacement(device)
    if value == "auto":
        return IndexPlacement(None, f"index device auto: {reason}")
    raise IndexDeviceError(
        f"index device {value!r} cannot be used: {reason}; set it to auto or cpu, or run where faiss "
        "has GPU support and the device is visible"
    )
