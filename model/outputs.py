"""What the towers and the focused views return: plain tensors in dataclasses, shared by model, losses, evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextOutput:
    i1: torch.Tensor  # [B, D] normalised: the broad-view query vector
    indicators: torch.Tensor  # [B, m-1, D] normalised: I_2..I_m, the focused-view queries


@dataclass
class VideoOutput:
    frame_tokens: torch.Tensor  # [N, T, D] normalised per frame
    cls: torch.Tensor  # [N, D] normalised temporal mean


@dataclass
class FocusOutput:
    delta: torch.Tensor  # [B, k] score corrections (0 for masked slots)
    attention: torch.Tensor  # [B, Q, k, L] last block's attention, averaged over heads
