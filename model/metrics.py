"""Retrieval metrics: R@1/5/10, median and mean rank, broad view and two-stage, both directions."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Ties are broken pessimistically: the true item ranks after every other item with an equal score. This makes
# a constant scorer score worst, never best, and keeps two-stage R@k equal to broad R@k when k = top_k.


def ranks_from_scores(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Rank (1-based) of the best true item per row.

    scores: [Q, N]; truth: bool [Q, N] with at least one True per row (several: the best-ranked one counts).
    rank = 1 + number of non-true items scoring >= the best true score.
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    if not truth.any(axis=1).all():
        raise ValueError("every query needs at least one true item")
    best = np.where(truth, scores, -np.inf).max(axis=1, keepdims=True)
    return 1 + ((scores >= best) & ~truth).sum(axis=1)


def summarize(ranks: np.ndarray) -> dict[str, float]:
    ranks = np.asarray(ranks)
    return {
        "R@1": float(100.0 * np.mean(ranks <= 1)),
        "R@5": float(100.0 * np.mean(ranks <= 5)),
        "R@10": float(100.0 * np.mean(ranks <= 10)),
        "MdR": float(np.median(ranks)),
        "MnR": float(np.mean(ranks)),
    }


# Re-scores the candidates of a batch of queries: (query rows [B], candidate columns [B, k]) -> delta [B, k].
Rescorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def two_stage_ranks(
    scores: np.ndarray,
    truth: np.ndarray,
    k: int,
    rescore: Rescorer,
    batch_size: int = 256,
    deltas_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Broad-view ranks and two-stage ranks for every query.

    The top-k candidates by broad score (with the same pessimistic ties) are re-scored with S = S' + delta;
    a true item outside the top-k keeps its broad rank. `deltas_out` ([Q, k], optional) receives every
    query's corrections in broad-rank order (for slot_spread).
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    broad = ranks_from_scores(scores, truth)
    k = min(k, scores.shape[1])
    # Sort key: score desc, then non-true before true (pessimistic), then column index for determinism.
    order = np.lexsort((np.arange(scores.shape[1])[None].repeat(len(scores), 0), truth, -scores), axis=1)
    cand = order[:, :k]  # [Q, k]
    two = broad.copy()
    for start in range(0, len(scores), batch_size):
        rows = np.arange(start, min(start + batch_size, len(scores)))
        c = cand[rows]
        delta = np.asarray(rescore(rows, c), dtype=np.float64)
        if deltas_out is not None:
            deltas_out[rows] = delta
        final = np.take_along_axis(scores[rows], c, 1) + delta
        t = np.take_along_axis(truth[rows], c, 1)
        has = t.any(axis=1)
        within = ranks_from_scores(final[has], t[has])
        two[rows[has]] = within
    return broad, two


def retrieval_report(broad: np.ndarray, two: np.ndarray) -> dict[str, dict[str, float]]:
    return {"broad": summarize(broad), "two_stage": summarize(two)}


def group_r1(ranks: np.ndarray, groups: Sequence[str]) -> dict[str, float]:
    """R@1 per group label (e.g. which attribute separated the true clip from its siblings)."""
    ranks = np.asarray(ranks)
    labels = np.asarray(groups)
    return {str(g): float(100.0 * np.mean(ranks[labels == g] <= 1)) for g in sorted(set(labels.tolist()))}


# A focused view whose corrections vary across queries by less than this fraction of how much their mean
# varies across broad-view ranks is judged to express a prior over ranks rather than to read its candidates.
RANK_PRIOR_RATIO = 0.25


def slot_spread(deltas: np.ndarray) -> dict[str, object]:
    """The rank-prior diagnostic of a focused view's corrections deltas [Q, k], columns in broad-rank order.

    `between`: the spread (std) of the per-slot means across the k slots; `within`: the mean over slots of
    the spread across queries within one slot. A view that reads its candidates has corrections that change
    from query to query (within is large); one whose correction depends on the slot alone has within ~ 0
    and between > 0. `verdict` is "inactive" (no correction at all), "rank prior" (within below
    RANK_PRIOR_RATIO x between) or "content".
    """
    d = np.asarray(deltas, dtype=np.float64)
    if d.ndim != 2 or not d.size:
        raise ValueError(f"deltas must be a non-empty [queries, k] array, got shape {d.shape}")
    means, stds = d.mean(axis=0), d.std(axis=0)
    between, within = float(means.std()), float(stds.mean())
    if np.abs(d).max() < 1e-9:
        verdict = "inactive"
    elif within < RANK_PRIOR_RATIO * between:
        verdict = "rank prior"
    else:
        verdict = "content"
    return {
        "mean_by_slot": [round(float(x), 4) for x in means],
        "std_by_slot": [round(float(x), 4) for x in stds],
        "between": round(between, 5),
        "within": round(within, 5),
        "verdict": verdict,
    }
