"""How a model's score cut-off separates captions of clips in the gallery from captions of things it lacks.

    .venv/bin/python -m bench.cutoff assets/demo-model --manifest /work/demo/lib/test.jsonl \\
        --cache-dir /work/demo/cache --cutoffs 1.405 1.491 1.602

The gallery is the manifest's clips; "own" are its captions (each clip's top-1 two-stage score), "unrelated"
are the sentences below, none of which the generated library holds. Prints percentiles and, per cut-off,
the share of each set that passes it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from model.calibrate import top1_scores
from model.checkpoint import load_model
from model.data import FrameCache, prepare_clips
from model.evaluate import encode_clipset
from model.manifest import read_manifest

UNRELATED = [
    "a man cooking pasta in a kitchen",
    "aerial view of a city at night",
    "a dog catches a frisbee on the beach",
    "people dancing at a wedding",
    "a news anchor reads the headlines",
    "snow falling on a mountain village",
    "a child blowing out birthday candles",
    "a football match in the rain",
    "a cat sleeping on a sofa",
    "waves crashing on rocks",
    "a woman typing on a laptop",
    "cars in heavy traffic",
    "fireworks over a harbour",
    "a chef slicing onions",
    "a plane taking off",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--cutoffs", type=float, nargs="+", default=[])
    args = parser.parse_args()
    model = load_model(args.checkpoint).eval()
    cache = FrameCache(args.cache_dir, model.config.num_frames, model.config.image_size)
    clips = prepare_clips(read_manifest(args.manifest), cache, progress=False)
    with torch.inference_mode():
        text, video = encode_clipset(model, clips, 32)
        own = top1_scores(model, text, video, np.asarray(clips.clip_index))["two_stage"][0]
        unrelated = top1_scores(model, model.encode_queries(UNRELATED), video, np.full(len(UNRELATED), -1))
    other = unrelated["two_stage"][0]
    print(
        f"own captions ({len(own)}): p5/p25/p50/p75/p95 = {np.percentile(own, [5, 25, 50, 75, 95]).round(3)}"
    )
    print(
        f"unrelated ({len(other)}): min/median/max = {other.min():.3f} / {np.median(other):.3f} / {other.max():.3f}"
    )
    print("| cut-off | own captions passing | unrelated passing |\n|---:|---:|---:|")
    for c in args.cutoffs:
        print(f"| {c:.3f} | {(own >= c).mean():.1%} | {(other >= c).mean():.1%} |")


if __name__ == "__main__":
    main()
