"""Focused view: queries attend over k candidates' tokens together and emit one score correction per slot."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.outputs import FocusOutput

logger = logging.getLogger(__name__)

# Initial scale of the tied query/key projections (see CrossAttentionBlock); only initialisation uses it.
ATTENTION_INIT_GAIN = 3.0


class CrossAttentionBlock(nn.Module):
    """LayerNorm, multi-head cross-attention, residual, feed-forward, residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"focus dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.ln_q = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        # Start as a similarity search: with W_k = W_q, a query first attends to the tokens that resemble it
        # (queries and keys share CLIP's embedding space). With independent random W_q, W_k the attention
        # starts uniform, every slot's evidence averages out, and behind the zero-initialised head no
        # gradient ever tells the attention where to look: the focused view then learns nothing but a prior
        # over broad-view ranks (measured on the generated library: two-stage R@1 stayed equal to broad).
        # The search must also be sharp: with nn.Linear's default init, a token matching the query exactly
        # gets a logit of only about sqrt(head_dim) / 3 (2.3 for the small preset), so near-duplicate
        # candidates share the attention almost evenly (the true slot drew 12% of it, a sibling 10%) and the
        # head sees no evidence to learn from. Scaling W_q = W_k by ATTENTION_INIT_GAIN multiplies the logits
        # by its square (an exact match then scores ~20): with the true clip's own frames as queries, the
        # focused view went from never beating the broad ranking in 1,200 steps to 89% top-1 in 150.
        with torch.no_grad():
            self.q_proj.weight.mul_(ATTENTION_INIT_GAIN)
            self.k_proj.weight.copy_(self.q_proj.weight)
            self.k_proj.bias.copy_(self.q_proj.bias)

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor | None, gumbel_tau: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, Q, D = x.shape
        N = kv.shape[1]
        H, hd = self.heads, D // self.heads
        kv_n = self.ln_kv(kv)
        q = self.q_proj(self.ln_q(x)).view(B, Q, H, hd)
        if _factored_is_cheaper(Q, N, D, H):
            weights, out = self._attend_factored(q, kv_n, key_mask, gumbel_tau)
        else:
            weights, out = self._attend_projected(q, kv_n, key_mask, gumbel_tau)
        x = x + self.out_proj(out.reshape(B, Q, D))
        x = x + self.mlp(self.ln_mlp(x))
        return x, weights.mean(dim=1)

    def _attend_projected(
        self, q: torch.Tensor, kv_n: torch.Tensor, key_mask: torch.Tensor | None, gumbel_tau: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Textbook attention: project every key and value token, then attend.

        Returns the weights [B, H, Q, N] and out [B, Q, H, hd].
        """
        B, Q, H, hd = q.shape
        N = kv_n.shape[1]
        k = self.k_proj(kv_n).view(B, N, H, hd).transpose(1, 2)  # [B, H, N, hd]
        v = self.v_proj(kv_n).view(B, N, H, hd).transpose(1, 2)
        logits = q.transpose(1, 2) @ k.transpose(-1, -2) / math.sqrt(hd)  # [B, H, Q, N]
        weights = _attention_weights(logits, key_mask, gumbel_tau)
        return weights, (weights @ v).transpose(1, 2)

    def _attend_factored(
        self, q: torch.Tensor, kv_n: torch.Tensor, key_mask: torch.Tensor | None, gumbel_tau: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same attention with the projections moved to the query side, for few queries over many tokens.

        q_h . (W_k,h x + b_k,h) = (W_k,h^T q_h) . x + q_h . b_k,h, and, since the weights sum to 1,
        sum_n w_n (W_v,h x_n + b_v,h) = W_v,h (sum_n w_n x_n) + b_v,h. So the D x D projections run on the
        Q queries instead of the N key tokens: for the text->video view (3 queries, 10 x 12 tokens) about
        14 times fewer multiply-adds, same result. Every step is one batched matmul over the heads.
        """
        B, Q, H, hd = q.shape
        N, D = kv_n.shape[1:]
        q_h = (q * (1.0 / math.sqrt(hd))).permute(2, 0, 1, 3).reshape(H, B * Q, hd)  # scaled once, per head
        q_in = torch.bmm(q_h, self.k_proj.weight.view(H, hd, D))  # [H, B*Q, D]: queries in the tokens' space
        q_in = q_in.view(H, B, Q, D).transpose(0, 1).reshape(B, H * Q, D)
        logits = torch.bmm(q_in, kv_n.transpose(1, 2)).view(B, H, Q, N)
        if torch.is_grad_enabled():
            # q . b_k is the same for every token, so softmax ignores it and inference skips it; training
            # keeps it for identical logits and for b_k's (zero) gradient, which DistributedDataParallel
            # expects of every parameter.
            q_bias = torch.bmm(q_h, self.k_proj.bias.view(H, hd, 1)).view(H, B, Q).permute(1, 0, 2)
            logits = logits + q_bias[..., None]
        weights = _attention_weights(logits, key_mask, gumbel_tau)
        # The attention-weighted mean of the tokens, per head and query, then W_v,h on it.
        pooled = torch.bmm(weights.reshape(B, H * Q, N), kv_n)  # [B, H*Q, D]
        pooled = pooled.view(B, H, Q, D).transpose(0, 1).reshape(H, B * Q, D)
        out = torch.bmm(pooled, self.v_proj.weight.view(H, hd, D).transpose(1, 2))  # [H, B*Q, hd]
        return weights, out.view(H, B, Q, hd).permute(1, 2, 0, 3) + self.v_proj.bias.view(H, hd)


def _factored_is_cheaper(queries: int, tokens: int, dim: int, heads: int) -> bool:
    """Multiply-adds of projecting the tokens (2 N D^2 + 2 Q N D) against the queries (2 Q D^2 + 2 H Q N D)."""
    return queries * dim + heads * queries * tokens < tokens * dim + queries * tokens


def _attention_weights(
    logits: torch.Tensor, key_mask: torch.Tensor | None, gumbel_tau: float | None
) -> torch.Tensor:
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    if gumbel_tau is not None:
        return F.gumbel_softmax(logits, tau=gumbel_tau, hard=False, dim=-1)
    return logits.softmax(dim=-1)


FOCUS_HEADS = ("candidate", "slot")
# Per query and candidate, the evidence the candidate head reads (see FocusedView._candidate_evidence).
_EVIDENCE = 4


class FocusedView(nn.Module):
    """One-to-many re-scoring of k candidates.

    text->video: queries are I_2..I_m, candidates are videos with L = T frame tokens each.
    video->text: queries are a video's T frame tokens, candidates are captions with L = m-1 indicators each.
    Keys get a position embedding (frame index / indicator index). The attention is joint over all k x L
    tokens, so the candidates compete for each query (one-to-many).

    head="candidate" (the default): each candidate's correction comes from one small MLP shared by all
    candidates and fed only by that candidate's own evidence, so the view is permutation-equivariant over
    the candidates and cannot express a prior over broad-view ranks. head="slot" (the first design, kept for
    comparison): the keys also get a slot embedding (broad-view rank) and an MLP maps the concatenated
    attended queries to k per-slot outputs; measured on a held-out generator it learned only its last
    layer's per-slot bias (docs/architecture.md).
    """

    def __init__(
        self,
        dim: int,
        num_queries: int,
        num_slots: int,
        seq_len: int,
        layers: int,
        heads: int,
        head: str = "candidate",
    ) -> None:
        super().__init__()
        if head not in FOCUS_HEADS:
            raise ValueError(f"unknown focus head {head!r}; expected one of {FOCUS_HEADS}")
        self.num_queries, self.num_slots, self.seq_len, self.head_kind = num_queries, num_slots, seq_len, head
        self.query_pos = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.key_pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.slot_emb: nn.Parameter | None = None
        if head == "slot":
            self.slot_emb = nn.Parameter(torch.randn(num_slots, dim) * 0.02)
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, heads) for _ in range(layers))
        if head == "slot":
            # in this order: the same initialisation as before the candidate head existed
            first, last = nn.Linear(num_queries * dim, dim), nn.Linear(dim, num_slots)
        else:
            # Twice the evidence: each value as it is and relative to the mean over the k candidates.
            first, last = nn.Linear(2 * _EVIDENCE * num_queries, dim), nn.Linear(dim, 1)
        # Zero-initialised last layer: an untrained focused view changes no score and no ranking.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.head = nn.Sequential(first, nn.GELU(), last)

    def forward(
        self,
        queries: torch.Tensor,  # [B, Q, D]
        candidates: torch.Tensor,  # [B, k, L, D], k <= num_slots
        slot_mask: torch.Tensor | None = None,  # [B, k] True where the slot holds a real candidate
        gumbel_tau: float | None = None,
    ) -> FocusOutput:
        B, k, L, D = candidates.shape
        if k > self.num_slots or L != self.seq_len or queries.shape[1] != self.num_queries:
            raise ValueError(
                f"focused view expects <= {self.num_slots} candidates of {self.seq_len} tokens and "
                f"{self.num_queries} queries, got {k} x {L} and {queries.shape[1]}"
            )
        dtype = self.key_pos.dtype
        cands = candidates.to(dtype)
        pos = self.key_pos[None] if self.slot_emb is None else self.key_pos[None] + self.slot_emb[:k, None]
        kv = (cands + pos).reshape(B, k * L, D)  # one add of [k, L, D]
        key_mask = None
        if slot_mask is not None:
            key_mask = slot_mask[:, :, None].expand(B, k, L).reshape(B, k * L)
        q_in = queries.to(dtype)
        x = q_in + self.query_pos[None]
        attn = None
        for block in self.blocks:
            x, attn = block(x, kv, key_mask, gumbel_tau)
        assert attn is not None
        attn = attn.view(B, -1, k, L)
        if self.slot_emb is not None:
            delta = self.head(x.reshape(B, -1))[:, :k]  # [B, k]
        else:
            evidence = self._candidate_evidence(q_in, x, cands, attn, slot_mask)  # [B, k, 2 * E * Q]
            delta = self.head(evidence).squeeze(-1)  # [B, k]: one head, the same for every candidate
        if slot_mask is not None:
            delta = delta.masked_fill(~slot_mask, 0.0)
        return FocusOutput(delta=delta.float(), attention=attn.float())

    @staticmethod
    def _candidate_evidence(
        queries: torch.Tensor,  # [B, Q, D] as given (normalised embeddings)
        out: torch.Tensor,  # [B, Q, D] the blocks' output for each query
        cands: torch.Tensor,  # [B, k, L, D] as given (normalised embeddings, no position)
        attn: torch.Tensor,  # [B, Q, k, L] the last block's joint attention, averaged over heads
        slot_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """What each query drew from each candidate, as E numbers per (candidate, query):

        - the attention mass the candidate received (x k, so 1 means an even share): the one-to-many part,
          as the candidates compete for the query;
        - the cosine between the query and the candidate's tokens pooled by that query's attention within
          the candidate, and between the blocks' output and the same pooled tokens: how well what it
          attended to matches;
        - the best cosine between the query and any one token of the candidate.

        Each is also given relative to its mean over the real candidates (a side-by-side comparison).
        Nothing here depends on a candidate's slot, so permuting the candidates permutes the rows.
        """
        B, Q, k, L = attn.shape
        mass = attn.sum(dim=-1)  # [B, Q, k]
        local = attn / mass.clamp_min(1e-12)[..., None]  # the attention within each candidate, sums to 1
        pooled = F.normalize(torch.einsum("bqkl,bkld->bqkd", local, cands), dim=-1)  # [B, Q, k, D]
        q_n, o_n = F.normalize(queries, dim=-1), F.normalize(out, dim=-1)
        match_q = torch.einsum("bqd,bqkd->bqk", q_n, pooled)
        match_o = torch.einsum("bqd,bqkd->bqk", o_n, pooled)
        best = torch.einsum("bqd,bkld->bqkl", q_n, cands).amax(dim=-1)  # [B, Q, k]
        if slot_mask is None:
            ev = torch.stack([mass * k, match_q, match_o, best], dim=-1)  # [B, Q, k, E]
            mean = ev.mean(dim=2, keepdim=True)
        else:
            real = slot_mask.sum(dim=1).clamp_min(1).to(mass.dtype)[:, None, None]  # [B, 1, 1]
            ev = torch.stack([mass * real, match_q, match_o, best], dim=-1)
            m = slot_mask[:, None, :, None].to(ev.dtype)
            mean = (ev * m).sum(dim=2, keepdim=True) / real[..., None]
        ev = torch.cat([ev, ev - mean], dim=-1)  # [B, Q, k, 2E]
        return ev.permute(0, 2, 1, 3).reshape(B, k, Q * 2 * _EVIDENCE)
