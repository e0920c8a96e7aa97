"""The focused view's attention: the factored form (projections on the query side) equals the textbook one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.focused import CrossAttentionBlock, FocusedView, _factored_is_cheaper


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

    view = FocusedView(dim=192, num_queries=3, num_slots=10, seq_len=12, layers=1, heads=4)
    cands = F.normalize(torch.randn(8, 10, 12, 192), dim=-1)
    target_slot = torch.randint(0, 10, (8,))
    queries = cands[torch.arange(8), target_slot][:, [2, 5, 9]]  # three of the target's own frames
    with torch.no_grad():
        out = view(queries, cands)
    mass = out.attention.sum(-1).mean(1)  # [B, k]: attention per slot, averaged over the queries
    assert (mass.argmax(1) == target_slot).all()
    assert mass[torch.arange(8), target_slot].min() > 0.5  # a uniform attention would give 0.1


def _trained_view(head: str = "candidate", seed: int = 0) -> FocusedView:
    """A view whose last layer is no longer zero (as after training), so every path carries signal."""
    torch.manual_seed(seed)
    view = FocusedView(dim=32, num_queries=3, num_slots=6, seq_len=5, layers=1, heads=4, head=head).double()
    with torch.no_grad():
        view.head[-1].weight.normal_(0.0, 0.5)
        view.head[-1].bias.normal_(0.0, 0.5)
    return view


def _inputs(batch: int = 4, k: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    queries = F.normalize(torch.randn(batch, 3, 32, dtype=torch.float64), dim=-1)
    cands = F.normalize(torch.randn(batch, k, 5, 32, dtype=torch.float64), dim=-1)
    return queries, cands


def test_reordering_the_candidates_reorders_the_corrections():
    view = _trained_view()
    queries, cands = _inputs()
    with torch.no_grad():
        base = view(queries, cands).delta
        for _ in range(3):
            perm = torch.randperm(6)
            moved = view(queries, cands[:, perm]).delta
            torch.testing.assert_close(moved, base[:, perm], rtol=0, atol=1e-12)
    assert base.std(dim=1).min() > 1e-3, "the corrections differ between candidates"


def test_the_slot_head_is_kept_for_comparison_and_is_not_equivariant():
    view = _trained_view("slot")
    queries, cands = _inputs()
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    with torch.no_grad():
        base, moved = view(queries, cands).delta, view(queries, cands[:, perm]).delta
    assert not torch.allclose(moved, base[:, perm], atol=1e-6)
    # Identical candidates in every slot still get different corrections: a prior over slots.
    same = cands[:, :1].expand(-1, 6, -1, -1)
    with torch.no_grad():
        assert view(queries, same).delta.std(dim=1).min() > 1e-3


def test_identical_candidates_get_identical_corrections():
    """No prior over broad-view ranks can be expressed: the same candidate scores the same in every slot."""
    view = _trained_view()
    queries, cands = _inputs()
    same = cands[:, 2:3].expand(-1, 6, -1, -1)
    with torch.no_grad():
        delta = view(queries, same).delta
    torch.testing.assert_close(delta, delta[:, :1].expand_as(delta), rtol=0, atol=1e-12)


def test_an_untrained_view_changes_nothing():
    for head in ("candidate", "slot"):
        view = FocusedView(dim=32, num_queries=3, num_slots=6, seq_len=5, layers=2, heads=4, head=head)
        queries, cands = _inputs()
        assert view(queries.float(), cands.float()).delta.abs().max() == 0


def test_missing_candidates_do_not_change_the_others():
    """Padding slots (slot_mask False) get 0 and take no attention nor part in the side-by-side means."""
    view = _trained_view()
    queries, cands = _inputs(k=6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 4:] = False
    padded = cands.clone()
    padded[:, 4:] = 0.0
    with torch.no_grad():
        short = view(queries, cands[:, :4]).delta
        full = view(queries, padded, slot_mask=mask).delta
    torch.testing.assert_close(full[:, :4], short, rtol=0, atol=1e-12)
    assert full[:, 4:].abs().max() == 0


def test_an_unknown_head_is_refused():
    with pytest.raises(ValueError, match="focus head"):
        FocusedView(dim=32, num_queries=3, num_slots=6, seq_len=5, layers=1, heads=4, head="rank")
