"""TokenBinder losses: symmetric InfoNCE on I_1 vs CLS plus focused-view cross-entropy over in-batch top-k.

Like open_clip's ClipLoss, the losses take tensors (the towers' outputs, the temperature) and know nothing of
the model: the focused views come in through the small `FocusedViews` protocol.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
import torch.nn.functional as F

from model.outputs import FocusOutput, TextOutput, VideoOutput

logger = logging.getLogger(__name__)


class FocusedViews(Protocol):
    """The two focused views the focus losses train (TokenBinder has them)."""

    def rescore_videos(self, indicators: torch.Tensor, candidate_tokens: torch.Tensor) -> FocusOutput: ...

    def rescore_texts(
        self, frame_tokens: torch.Tensor, candidate_indicators: torch.Tensor
    ) -> FocusOutput: ...


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


def grounding_loss(text: TextOutput, video: VideoOutput, scale: torch.Tensor) -> torch.Tensor:
    """Indicator grounding (ours, optional): I_{j+1} against the mean of the j-th of m-1 equal time spans.

    Symmetric InfoNCE per indicator over the batch, averaged over the indicators. It tells a text tower
    trained from scratch that the indicators should say what happens when: without it, such a tower
    embeds "A, then B" and "B, then A" (or "moves left" and "moves right") almost alike in every output,
    because the broad view's temporal mean cannot tell them apart either, and the focused view has
    nothing to attend with (measured: indicator cosine 0.975-0.999 between such captions).
    """
    queries = text.indicators.shape[1]
    frames = video.frame_tokens.shape[1]
    if frames < queries:
        raise ValueError(f"grounding needs at least {queries} frames (one span per indicator), got {frames}")
    labels = torch.arange(text.indicators.shape[0], device=text.indicators.device)
    total = text.indicators.new_zeros(())
    for j, span in enumerate(torch.tensor_split(video.frame_tokens, queries, dim=1)):
        logits = scale * F.normalize(text.indicators[:, j], dim=-1) @ F.normalize(span.mean(dim=1), dim=-1).T
        total = total + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return total / queries


def tokenbinder_losses(
    views: FocusedViews,
    text: TextOutput,
    video: VideoOutput,
    *,
    scale: torch.Tensor,
    top_k: int,
    ground_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Loss = (l_t2v + l_v2t)/2 + (l_focus_t + l_focus_v)/2 [+ ground_weight * l_ground], with its parts.

    `scale` is the learned temperature (exp of logit_scale), `top_k` how many in-batch candidates the focused
    views re-score together.
    """
    l_t2v, l_v2t = contrastive_losses(text, video, scale)
    sim = text.i1 @ video.cls.T  # [B, B] broad view S'
    k = min(top_k, sim.shape[0])

    # The focus losses train the focused views only through their corrections: the broad scores and the
    # temperature enter them as constants. With gradients through `sim` the focus loss is a second, harder
    # contrastive loss on the broad view (its top-k are the hardest in-batch negatives), so the view's own
    # gain cannot be told from a sharper broad view, and the loss falls without the view reading anything.
    fixed_scale, fixed_sim = scale.detach(), sim.detach()
    idx, target = topk_with_truth(fixed_sim, k)  # videos for each text
    focus = views.rescore_videos(text.indicators, video.frame_tokens[idx])  # [B, k, T, D]
    logits = fixed_scale * (fixed_sim.gather(1, idx) + focus.delta)
    l_focus_t = F.cross_entropy(logits, target)

    sim_v = fixed_sim.T  # [B videos, B texts]
    idx_v, target_v = topk_with_truth(sim_v, k)
    focus_v = views.rescore_texts(video.frame_tokens, text.indicators[idx_v])  # [B, k, m-1, D]
    logits_v = fixed_scale * (sim_v.gather(1, idx_v) + focus_v.delta)
    l_focus_v = F.cross_entropy(logits_v, target_v)

    loss = (l_t2v + l_v2t) / 2 + (l_focus_t + l_focus_v) / 2
    parts = {
        "contrastive_t2v": l_t2v.detach(),
        "contrastive_v2t": l_v2t.detach(),
        "focus_t2v": l_focus_t.detach(),
        "focus_v2t": l_focus_v.detach(),
    }
    if ground_weight:
        l_ground = grounding_loss(text, video, scale)
        loss = loss + ground_weight * l_ground
        parts["ground"] = l_ground.detach()
    return {"loss": loss, **parts}
