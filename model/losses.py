"""TokenBinder losses: symmetric InfoNCE on I_1 vs CLS plus focused-view cross-entropy over in-batch top-k."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from model.tokenbinder import TextOutput, TokenBinder, VideoOutput

logger = logging.getLogger(__name__)


def topk_with_truth(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch top-k per row of sim [B, N] where row i's true column is i.

    If the true column is not among the top-k it replaces the lowest one, and the slots are re-sorted by sim so
    that slot order still means broad-view rank. Returns (indices [B, k], target slot [B]).
    """
    B = sim.shape[0]
    rows = torch.arange(B, device=sim.device)
    with torch.no_grad():
        idx = sim.topk(k, dim=1).indices  # [B, k] sorted by sim
        present = (idx == rows[:, None]).any(dim=1)
        idx[:, -1] = torch.where(present, idx[:, -1], rows)
        order = sim.gather(1, idx).argsort(dim=1, descending=True, stable=True)
        idx = idx.gather(1, order)
        target = (idx == rows[:, None]).float().argmax(dim=1)
    return idx, target


def contrastive_losses(
    text: TextOutput, video: VideoOutput, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = scale * text.i1 @ video.cls.T  # [B, B]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)


def tokenbinder_losses(model: TokenBinder, text: TextOutput, video: VideoOutput) -> dict[str, torch.Tensor]:
    """Loss = (l_t2v + l_v2t)/2 + (l_focus_t + l_focus_v)/2, returned with its parts."""
    scale = model.logit_scale
    l_t2v, l_v2t = contrastive_losses(text, video, scale)
    sim = text.i1 @ video.cls.T  # [B, B] broad view S'
    k = min(model.config.top_k, sim.shape[0])

    idx, target = topk_with_truth(sim, k)  # videos for each text
    focus = model.rescore_videos(text.indicators, video.frame_tokens[idx])  # [B, k, T, D]
    logits = scale * (sim.gather(1, idx) + focus.delta)
    l_focus_t = F.cross_entropy(logits, target)

    sim_v = sim.T  # [B videos, B texts]
    idx_v, target_v = topk_with_truth(sim_v, k)
    focus_v = model.rescore_texts(video.frame_tokens, text.indicators[idx_v])  # [B, k, m-1, D]
    logits_v = scale * (sim_v.gather(1, idx_v) + focus_v.delta)
    l_focus_v = F.cross_entropy(logits_v, target_v)

    loss = (l_t2v + l_v2t) / 2 + (l_focus_t + l_focus_v) / 2
    return {
        "loss": loss,
        "contrastive_t2v": l_t2v.detach(),
        "contrastive_v2t": l_v2t.detach(),
        "focus_t2v": l_focus_t.detach(),
        "focus_v2t": l_focus_v.detach(),
    }
