"""TokenBinder forward passes: parity with open_clip, indicators, frame tokens, focused view."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import build_model, load_model
from model.config import preset_config

CAPTIONS = [
    "a red square moves left, then a blue circle moves up, on a white background",
    "dog",
    "a team in blue uniforms plays badminton in a large sports hall while the crowd watches " * 3,
]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _reference(model, texts):
    ids = open_clip.get_tokenizer("ViT-B-32")(texts)
    with torch.no_grad():
        return F.normalize(model.clip.encode_text(ids), dim=-1)


@pytest.mark.parametrize("truncate", [True, False])
def test_i1_matches_open_clip_encode_text(tiny, truncate):
    texts = CAPTIONS[:2]  # short enough that indicator truncation cuts nothing
    with torch.no_grad():
        out = tiny.encode_text(tiny.tokenize(texts), truncate=truncate)
    assert (out.i1 - _reference(tiny, texts)).abs().max() <= 1e-5


def test_vit_b32_text_parity_mixed_lengths():
    model = build_model(preset_config("ViT-B-32"))
    texts = [CAPTIONS[0], CAPTIONS[1], "a man is cooking pasta in a kitchen"]
    with torch.no_grad():
        fast = model.encode_text(model.tokenize(texts), truncate=True)
        full = model.encode_text(model.tokenize(texts), truncate=False)
    ref = _reference(model, texts)
    assert (fast.i1 - ref).abs().max() <= 1e-5
    assert (full.i1 - ref).abs().max() <= 1e-5
    assert (fast.indicators - full.indicators).abs().max() <= 1e-5


def test_long_captions_are_truncated_to_fit_indicators(tiny):
    ids = tiny.tokenize([CAPTIONS[2]])
    assert ids.shape[1] == 77 - tiny.config.num_appended
    with torch.no_grad():
        out = tiny.encode_text(ids)
    assert out.i1.shape == (1, 32) and out.indicators.shape == (1, 3, 32)


def test_indicators_do_not_change_i1(tiny):
    ids = tiny.tokenize(CAPTIONS)
    with torch.no_grad():
        before = tiny.encode_text(ids)
        saved = tiny.indicators.detach().clone()
        tiny.indicators.add_(torch.randn_like(saved))
        after = tiny.encode_text(ids)
        tiny.indicators.copy_(saved)
    assert torch.equal(before.i1, after.i1)
    assert not torch.allclose(before.indicators, after.indicators)


def test_separate_i1_uses_an_appended_indicator():
    model = build_model(preset_config("tiny", separate_i1=True))
    with torch.no_grad():
        out = model.encode_text(model.tokenize(CAPTIONS[:2]))
    assert out.indicators.shape[1] == model.config.num_indicators - 1
    assert (out.i1 - _reference(model, CAPTIONS[:2])).abs().max() > 1e-3


def test_frames_give_normalised_tokens_and_mean_cls(tiny):
    frames = torch.randint(0, 256, (2, 4, 48, 40, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = tiny.encode_frames(tiny.preprocess_frames(frames))
    assert out.frame_tokens.shape == (2, 4, 32)
    assert torch.allclose(out.frame_tokens.norm(dim=-1), torch.ones(2, 4), atol=1e-5)
    assert torch.allclose(out.cls, F.normalize(out.frame_tokens.mean(1), dim=-1), atol=1e-6)


def test_untrained_focused_view_changes_nothing(tiny):
    with torch.no_grad():
        text = tiny.encode_text(tiny.tokenize(CAPTIONS))
        cands = F.normalize(torch.randn(3, 4, 4, 32), dim=-1)
        out = tiny.rescore_videos(text.indicators, cands)
        back = tiny.rescore_texts(cands[:, 0], text.indicators[None].expand(3, 3, 3, 32).clone()[:, :3])
    assert torch.equal(out.delta, torch.zeros(3, 4))
    assert torch.equal(back.delta, torch.zeros(3, 3))
    assert out.attention.shape == (3, 3, 4, 4)


def test_focused_view_batches_queries_and_masks_missing_slots(tiny):
    torch.manual_seed(1)
    torch.nn.init.normal_(tiny.focus_t2v.head[-1].weight)
    try:
        q = F.normalize(torch.randn(5, 3, 32), dim=-1)
        cands = F.normalize(torch.randn(5, 4, 4, 32), dim=-1)
        mask = torch.tensor([[True, True, False, False]] * 5)
        with torch.no_grad():
            batched = tiny.rescore_videos(q, cands, mask)
            single = tiny.rescore_videos(q[:1], cands[:1], mask[:1])
        assert torch.allclose(batched.delta[:1], single.delta, atol=1e-6)
        assert torch.equal(batched.delta[:, 2:], torch.zeros(5, 2))
        assert batched.delta[:, :2].abs().sum() > 0
        assert torch.equal(batched.attention[:, :, 2:], torch.zeros(5, 3, 2, 4))
    finally:
        torch.nn.init.zeros_(tiny.focus_t2v.head[-1].weight)


def test_training_forward_returns_named_losses_and_gradients(tiny):
    tiny.train()
    try:
        frames = tiny.preprocess_frames(torch.randint(0, 256, (3, 4, 32, 32, 3), dtype=torch.uint8))
        losses = tiny(tiny.tokenize(CAPTIONS), frames)
        losses["loss"].backward()
    finally:
        tiny.eval()
    assert set(losses) == {"loss", "contrastive_t2v", "contrastive_v2t", "focus_t2v", "focus_v2t"}
    assert torch.isfinite(losses["loss"])
    assert tiny.indicators.grad is not None and tiny.focus_t2v.head[-1].weight.grad.abs().sum() > 0
    tiny.zero_grad()
