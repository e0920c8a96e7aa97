"""Losses and retrieval metrics against hand-computed values."""

import numpy as np
import pytest
import torch

from model.losses import grounding_loss, topk_with_truth
from model.metrics import group_r1, ranks_from_scores, summarize, two_stage_ranks


def test_topk_swaps_in_truth_and_keeps_broad_order():
    sim = torch.tensor(
        [
            [0.1, 0.9, 0.8, 0.7],  # truth (col 0) is last: replaces 0.7, then sorted
            [0.5, 0.6, 0.1, 0.2],  # truth (col 1) already first
            [0.3, 0.2, 0.4, 0.9],
            [0.9, 0.1, 0.2, 0.3],  # truth (col 3) is second
        ]
    )
    idx, target = topk_with_truth(sim, 3)
    assert idx.tolist() == [[1, 2, 0], [1, 0, 3], [3, 2, 0], [0, 3, 2]]
    assert target.tolist() == [2, 0, 1, 1]
    assert torch.equal(idx.gather(1, target[:, None]).squeeze(1), torch.arange(4))


def test_ranks_hand_computed_with_ties():
    scores = np.array(
        [
            [0.9, 0.5, 0.1],  # truth 0 -> rank 1
            [0.5, 0.5, 0.1],  # truth 1 tied with 0 -> pessimistic rank 2
            [0.2, 0.3, 0.1],  # truth 2 -> rank 3
        ]
    )
    truth = np.eye(3, dtype=bool)
    ranks = ranks_from_scores(scores, truth)
    assert ranks.tolist() == [1, 2, 3]
    m = summarize(ranks)
    assert m["R@1"] == pytest.approx(100 / 3)
    assert m["R@5"] == 100.0 and m["MdR"] == 2.0 and m["MnR"] == 2.0


def test_best_of_several_true_items_counts():
    scores = np.array([[0.1, 0.8, 0.9, 0.7]])
    truth = np.array([[True, False, False, True]])  # best true is 0.7 -> two items above
    assert ranks_from_scores(scores, truth).tolist() == [3]


def test_constant_scores_rank_worst():
    assert ranks_from_scores(np.zeros((2, 5)), np.eye(2, 5, dtype=bool)).tolist() == [5, 5]


def test_two_stage_reorders_only_topk_and_keeps_recall_at_k():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(200, 50))
    scores[:, :5] = 0.25  # ties at the boundary must not break the invariant
    truth = np.zeros_like(scores, dtype=bool)
    truth[np.arange(200), rng.integers(0, 50, 200)] = True
    broad, two = two_stage_ranks(scores, truth, 10, lambda rows, cols: rng.normal(size=cols.shape) * 3)
    assert np.mean(broad <= 10) == np.mean(two <= 10)
    assert np.array_equal(broad[broad > 10], two[broad > 10])
    assert (two != broad).any()


def test_two_stage_can_fix_a_near_tie():
    scores = np.array([[0.50, 0.51, 0.1]])
    truth = np.array([[True, False, False]])

    def rescore(rows, cols):
        return np.where(cols == 0, 0.05, 0.0)

    broad, two = two_stage_ranks(scores, truth, 2, rescore)
    assert broad.tolist() == [2] and two.tolist() == [1]


def test_group_r1():
    assert group_r1(np.array([1, 2, 1, 1]), ["a", "a", "b", "b"]) == {"a": 50.0, "b": 100.0}


def _outputs(frames: torch.Tensor, indicators: torch.Tensor):
    from model.outputs import TextOutput, VideoOutput

    cls = torch.nn.functional.normalize(frames.mean(dim=1), dim=-1)
    return TextOutput(cls, indicators), VideoOutput(frames, cls)


def test_grounding_rewards_indicators_that_follow_the_video_in_time():
    torch.manual_seed(0)
    frames = torch.nn.functional.normalize(torch.randn(6, 12, 16), dim=-1)  # B=6 videos, T=12
    spans = torch.stack([s.mean(dim=1) for s in torch.tensor_split(frames, 3, dim=1)], dim=1)  # [6, 3, 16]
    scale = torch.tensor(20.0)
    in_order = grounding_loss(*_outputs(frames, spans), scale)
    reversed_ = grounding_loss(*_outputs(frames, spans.flip(1)), scale)
    assert in_order < 0.05 < reversed_
    # Uneven spans (T not divisible by m-1) work; fewer frames than indicators cannot.
    assert torch.isfinite(grounding_loss(*_outputs(frames[:, :7], spans), scale))
    with pytest.raises(ValueError, match="at least 3 frames"):
        grounding_loss(*_outputs(frames[:, :2], spans), scale)


def test_grounding_joins_the_loss_only_when_weighted():
    from model.checkpoint import load_model

    model = load_model("tiny")
    torch.manual_seed(0)
    ids = model.tokenize(["a red square", "a blue circle", "a green cross", "a cyan triangle"])
    frames = model.preprocess_frames(torch.randint(0, 256, (4, model.config.num_frames, 32, 32, 3)).byte())
    model.train()  # the same Gumbel noise in both calls (seeded)
    plain = model(ids, frames)
    torch.manual_seed(0)
    model.zero_grad()
    grounded = model(ids, frames, ground_weight=0.5)
    assert "ground" not in plain and grounded["ground"] > 0
    torch.testing.assert_close(grounded["loss"], plain["loss"] + 0.5 * grounded["ground"])
    grounded["loss"].backward()
    assert model.indicators.grad is not None and model.indicators.grad.abs().sum() > 0


def test_the_focus_losses_do_not_train_the_broad_view():
    """The broad scores and the temperature enter the focus losses as constants: with an untrained (zero)
    focused view, the gradient on I_1 and CLS is exactly the contrastive losses' own."""
    from model.checkpoint import load_model
    from model.losses import contrastive_losses, tokenbinder_losses
    from model.outputs import TextOutput, VideoOutput

    model = load_model("tiny")
    torch.manual_seed(0)
    frames = torch.nn.functional.normalize(torch.randn(6, 4, 32), dim=-1)
    ind = torch.nn.functional.normalize(torch.randn(6, 3, 32), dim=-1)
    grads = []
    for which in ("all", "contrastive"):
        i1 = torch.nn.functional.normalize(
            torch.randn(6, 32, generator=torch.Generator().manual_seed(1)), dim=-1
        )
        i1.requires_grad_(True)
        cls = frames.mean(dim=1).clone().requires_grad_(True)
        text, video = TextOutput(i1, ind), VideoOutput(frames, cls)
        if which == "all":
            losses = tokenbinder_losses(model, text, video, scale=model.logit_scale, top_k=model.config.top_k)
            assert losses["focus_t2v"] > 0 and losses["focus_v2t"] > 0
            loss = losses["loss"]
        else:
            loss = sum(contrastive_losses(text, video, model.logit_scale)) / 2
        loss.backward()
        grads.append((i1.grad, cls.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_slot_spread_tells_a_rank_prior_from_content():
    from model.metrics import slot_spread

    rng = np.random.default_rng(0)
    prior = np.tile(np.linspace(0.08, -0.08, 10), (200, 1)) + rng.normal(0, 0.001, (200, 10))
    content = rng.normal(0, 0.15, (200, 10)) + np.linspace(0.05, -0.05, 10)
    assert slot_spread(prior)["verdict"] == "rank prior"
    report = slot_spread(content)
    assert report["verdict"] == "content" and report["within"] > report["between"]
    assert len(report["mean_by_slot"]) == 10
    assert slot_spread(np.zeros((5, 10)))["verdict"] == "inactive"
    with pytest.raises(ValueError):
        slot_spread(np.zeros(10))


def test_two_stage_hands_back_every_correction_in_broad_order():
    scores = np.array([[0.9, 0.5, 0.7], [0.1, 0.2, 0.3]])
    truth = np.eye(2, 3, dtype=bool)
    out = np.full((2, 2), np.nan)
    two_stage_ranks(scores, truth, 2, lambda rows, cols: cols.astype(float), deltas_out=out)
    np.testing.assert_array_equal(out, [[0, 2], [2, 1]])  # the candidates' column ids, best broad first
