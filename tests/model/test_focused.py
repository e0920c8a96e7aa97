"""The focused view's attention: the factored form (projections on the query side) equals the textbook one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.focused import CrossAttentionBlock, _factored_is_cheaper


def _block(dim: int, heads: int) -> CrossAttentionBlock:
    torch.manual_seed(0)
    block = CrossAttentionBlock(dim, heads).double()
    with torch.no_grad():  # independent W_q, W_k and non-zero biases, so no term cancels by accident
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    return block


@pytest.mark.parametrize("queries,tokens", [(3, 40), (12, 12), (1, 5)])
def test_factored_attention_equals_projected_attention(queries, tokens):
    block = _block(dim=16, heads=4)
    q = torch.randn(2, queries, 4, 4, dtype=torch.float64)
    kv = torch.randn(2, tokens, 16, dtype=torch.float64)
    mask = torch.ones(2, tokens, dtype=torch.bool)
    mask[1, tokens // 2 :] = False  # the second row's later tokens are missing candidates
    for key_mask, grad in [(None, True), (mask, True), (None, False), (mask, False)]:
        with torch.set_grad_enabled(grad):  # inference leaves out q . b_k, which softmax ignores
            wp, outp = block._attend_projected(q, kv, key_mask, None)
            wf, outf = block._attend_factored(q, kv, key_mask, None)
        torch.testing.assert_close(wf, wp, rtol=0, atol=1e-12)
        torch.testing.assert_close(outf, outp, rtol=0, atol=1e-12)
        if key_mask is not None:
            assert wf[1, :, :, tokens // 2 :].abs().max() == 0


def test_factored_attention_has_the_same_gradients():
    grads = []
    for attend in ("_attend_projected", "_attend_factored"):
        block = _block(dim=16, heads=2)
        torch.manual_seed(1)
        q = torch.randn(3, 2, 2, 8, dtype=torch.float64, requires_grad=True)
        kv = torch.randn(3, 30, 16, dtype=torch.float64, requires_grad=True)
        _, out = getattr(block, attend)(q, kv, None, None)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        params = (block.k_proj.weight, block.k_proj.bias, block.v_proj.weight, block.v_proj.bias)
        grads.append((q.grad, kv.grad, *(p.grad for p in params)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Every parameter gets a gradient in both forms (DistributedDataParallel requires it); b_k's is zero.
    assert all(g is not None for g in grads[1])


def test_block_forward_is_the_same_through_either_path(monkeypatch):
    block = _block(dim=32, heads=4)
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    kv = torch.randn(2, 60, 32, dtype=torch.float64)
    out = {}
    for cheaper in (True, False):
        monkeypatch.setattr("model.focused._factored_is_cheaper", lambda *a, c=cheaper: c)
        out[cheaper] = block(x, kv, None, None)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=1e-12)


def test_factored_form_is_chosen_where_it_saves_work():
    assert _factored_is_cheaper(queries=3, tokens=120, dim=512, heads=8)  # text->video, k=10, T=12
    assert not _factored_is_cheaper(queries=120, tokens=3, dim=512, heads=8)
    assert not _factored_is_cheaper(queries=12, tokens=12, dim=64, heads=8)


def test_untrained_attention_finds_the_token_that_matches_the_query():
    """At initialisation a query already points at its exact match among many candidate tokens (W_q = W_k,
    scaled): the head then has evidence to learn from (see CrossAttentionBlock)."""
    torch.manual_seed(0)
    from model.focused import FocusedView

    view = FocusedView(dim=192, num_queries=3, num_slots=10, seq_len=12, layers=1, heads=4)
    cands = F.normalize(torch.randn(8, 10, 12, 192), dim=-1)
    target_slot = torch.randint(0, 10, (8,))
    queries = cands[torch.arange(8), target_slot][:, [2, 5, 9]]  # three of the target's own frames
    with torch.no_grad():
        out = view(queries, cands)
    mass = out.attention.sum(-1).mean(1)  # [B, k]: attention per slot, averaged over the queries
    assert (mass.argmax(1) == target_slot).all()
    assert mass[torch.arange(8), target_slot].min() > 0.5  # a uniform attention would give 0.1
