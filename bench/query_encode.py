"""Benchmark: one-query text encoding (ours vs open_clip's encode_text) and focused-view cost on this CPU."""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

QUERY = "a man in a red shirt is cooking pasta in a small kitchen"


def p50_ms(fn: Callable[[], object], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def interleaved_p50(
    fns: dict[str, Callable[[], object]], runs: int, warmup: int, rounds: int = 5
) -> dict[str, float]:
    """Median over rounds that alternate the candidates, so load changes on a shared machine hit both alike."""
    per: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per[name].append(p50_ms(fn, max(1, runs // rounds), warmup))
    return {name: statistics.median(v) for name, v in per.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python bench/query_encode.py",
        description="p50 latency of encoding one ~10-word query with the ViT-B-32 text tower (random weights): "
        "TokenBinder.encode_text (truncated, in model.inference's precision) vs open_clip encode_text on 77 "
        "tokens, with 1 and 2 threads; and the focused view for 1 and 64 queries. Prints a markdown table.",
    )
    p.add_argument("--query", default=QUERY, help="the query text (default: a 12-word caption)")
    p.add_argument("--runs", type=int, default=100, help="timed runs per measurement (default: 100)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: 5)")
    p.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default: 1 2)"
    )
    p.add_argument("--preset", default="ViT-B-32", help="model preset (default: ViT-B-32)")
    args = p.parse_args(argv)

    from model.checkpoint import load_model
    from model.inference import prepare_for_inference

    model = prepare_for_inference(load_model(args.preset), "cpu", "auto")
    # open_clip as its users run it: fp32 weights, the padded 77 tokens; and our truncation alone in fp32.
    plain = load_model(args.preset).eval()
    dtype = str(model.dtype).removeprefix("torch.")
    ids = model.tokenize([args.query])
    full_ids = model.tokenizer([args.query])  # [1, 77]: what open_clip's encode_text sees
    n_tokens = int(ids.argmax(-1)) + 1
    cfg = model.config
    dim, k, T, Q = cfg.embed_dim, cfg.top_k, cfg.num_frames, cfg.num_indicators - 1
    gen = torch.Generator().manual_seed(0)

    rows = []
    with torch.inference_mode():
        diff = (
            (
                model.encode_text(ids).i1
                - torch.nn.functional.normalize(model.clip.encode_text(full_ids).float(), dim=-1)
            )
            .abs()
            .max()
        )
        for threads in args.threads:
            torch.set_num_threads(threads)
            t = interleaved_p50(
                {
                    "ours": lambda: model.encode_text(ids),
                    "open_clip": lambda: model.clip.encode_text(full_ids),
                    "ours_fp32": lambda: plain.encode_text(ids),
                    "open_clip_fp32": lambda: plain.clip.encode_text(full_ids),
                    "tokenize": lambda: model.tokenize([args.query]),
                },
                args.runs,
                args.warmup,
            )
            rows += [
                f"| text, 1 query, {threads} thread(s): ours ({dtype}) vs open_clip fp32 77 tokens (as is) "
                f"| {t['ours']:.2f} | {t['open_clip_fp32']:.2f} | {t['open_clip_fp32'] / t['ours']:.2f}x "
                f"| tokenize {t['tokenize']:.2f} ms |",
                f"| text, 1 query, {threads} thread(s): ours vs open_clip, both {dtype} "
                f"| {t['ours']:.2f} | {t['open_clip']:.2f} | {t['open_clip'] / t['ours']:.2f}x | same weights |",
                f"| text, 1 query, {threads} thread(s): ours vs open_clip, both fp32 "
                f"| {t['ours_fp32']:.2f} | {t['open_clip_fp32']:.2f} | {t['open_clip_fp32'] / t['ours_fp32']:.2f}x "
                f"| truncation alone |",
            ]
            for batch in (1, 64):
                ind = torch.nn.functional.normalize(torch.randn(batch, Q, dim, generator=gen), dim=-1).to(
                    model.dtype
                )
                cands = torch.nn.functional.normalize(
                    torch.randn(batch, k, T, dim, generator=gen), dim=-1
                ).to(model.dtype)
                ms = p50_ms(
                    lambda ind=ind, cands=cands: model.rescore_videos(ind, cands),
                    max(10, args.runs // 4),
                    args.warmup,
                )
                rows.append(
                    f"| focused view, {batch} quer{'y' if batch == 1 else 'ies'} x k={k} x T={T}, {threads} thread(s) "
                    f"| {ms:.2f} | | | {ms / batch:.3f} ms/query |"
                )
    print(
        f"preset {args.preset} (random weights), weights {dtype}, {torch.get_num_threads()} threads max, "
        f"query {n_tokens} tokens incl. start/end + {cfg.num_appended} indicators; "
        f"max |I_1 - open_clip| = {float(diff):.1e}\n"
    )
    print("| measurement | ours p50 ms | open_clip p50 ms | speed-up | note |")
    print("|---|---:|---:|---:|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
