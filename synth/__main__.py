"""`python -m synth --out DIR --families N`: write the generated sample library (manifest, splits, clips)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from synth.generator import KINDS, TIMINGS, GeneratorVariant, generate_library


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m synth", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--families", type=int, required=True, help="families of 6 clips each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", type=float, default=0.2, help="fraction of families in test.jsonl")
    parser.add_argument("--size", type=int, default=128, help="frame side in pixels")
    parser.add_argument("--fps", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=2)
    variants = parser.add_argument_group("variants (for testing on data a model was not tuned on)")
    variants.add_argument(
        "--timing", choices=(*TIMINGS, "mixed"), default="sequential", help="when the two events happen"
    )
    variants.add_argument(
        "--lengths", type=float, nargs="+", default=(), help="clip lengths in seconds, drawn per clip"
    )
    variants.add_argument(
        "--family-size", type=int, nargs=2, metavar=("MIN", "MAX"), default=(len(KINDS), len(KINDS)),
        help=f"clips per family, base included (default: {len(KINDS)}, every kind)",
    )  # fmt: skip
    variants.add_argument(
        "--held-out-wording", action="store_true", help="caption held-out families in other sentence shapes"
    )
    args = parser.parse_args(argv)
    variant = GeneratorVariant(
        args.timing, tuple(args.lengths), tuple(args.family_size), args.held_out_wording
    )

    def report(done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) == 0:
            print(f"synth: {done}/{total} families", file=sys.stderr, flush=True)

    summary = generate_library(
        args.out,
        args.families,
        args.seed,
        args.holdout,
        args.size,
        args.fps,
        args.seconds,
        args.workers,
        report,
        variant,
    )
    if args.json:
        print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(summary).items()}))
    print(
        f"synth: wrote {summary.clips} clips ({summary.train_families} train / {summary.test_families} test "
        f"families) to {summary.out_dir} in {summary.seconds:.1f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
