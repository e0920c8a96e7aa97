"""Retrieval quality on held-out data, for library variants that change what a model could overfit to.

For each variant and seed: generate a library (synth.generator) whose held-out families are never trained on,
train the demo model's recipe on its training families (`python -m model.train`, the flags of
assets/demo-model/TRAINING.md at a smaller scale), evaluate on the held-out families
(`python -m model.evaluate`), and record broad and two-stage R@1 in both directions with the focused view's
rank-prior diagnostic (model.metrics.slot_spread: a view whose corrections depend on the broad-view slot
alone is flagged). The table gives the median over seeds; quality.json keeps every run.

    .venv/bin/python bench/quality.py --out /tmp/quality --variants base timing length wording --seeds 0 1

A run whose metrics.json exists is not repeated, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from synth.generator import GeneratorVariant, generate_library

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    about: str
    generator: GeneratorVariant = GeneratorVariant()
    size: int = 128  # frame side in pixels (the model resizes to its own)


# "base" is the project's library, the one the focused view's design was chosen on; the others were not
# looked at while choosing it.
VARIANTS = {
    "base": Variant("the project's library (used to choose the design)"),
    "timing": Variant("events overlap, or the first object stays in view", GeneratorVariant(timing="mixed")),
    "length": Variant("clips of 3, 5 or 7 s", GeneratorVariant(lengths=(3.0, 5.0, 7.0))),
    "family": Variant("families of 4-6 clips", GeneratorVariant(family_size=(4, 6))),
    "wording": Variant("held-out caption wordings", GeneratorVariant(held_out_wording=True)),
    "size": Variant("48 px frames", size=48),
}
# The demo model's recipe (assets/demo-model/TRAINING.md) but for the scale (--epochs, --families).
RECIPE = [
    "--preset", "small", "--lr-backbone", "5e-4", "--lr-focus", "1e-3",
    "--warmup-steps", "60", "--ground-weight", "1", "--group-key", "family", "--no-progress",
]  # fmt: skip


def _run(cmd: list[str], log: Path, threads: int | None) -> None:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # evaluation and anything else torch runs in the process
    with log.open("a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        done = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False, env=env)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")


def run_one(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Generate, train and evaluate one (variant, seed); returns the evaluation metrics."""
    variant = VARIANTS[name]
    work = args.out / f"{name}-seed{seed}"
    metrics_path = work / "metrics.json"
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    started = time.perf_counter()
    lib = generate_library(
        work / "lib", args.families, seed, 0.2, variant.size, workers=1, variant=variant.generator
    )
    py = sys.executable
    train = [py, "-m", "model.train", "--manifest", str(lib.train), "--out", str(work / "run")]
    train += [
        *RECIPE,
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(seed),
    ]
    train += ["--cache-dir", str(args.out / "cache")]
    if args.focus_head:
        train += ["--focus-head", args.focus_head]
    if args.threads:
        train += ["--threads", str(args.threads)]
    if (work / "run" / "train_state.pt").is_file():
        train.append("--resume")
    _run(train, log, args.threads)
    evaluate = [py, "-m", "model.evaluate", "--checkpoint", str(work / "run" / "model")]
    evaluate += ["--manifest", str(lib.test), "--group-key", "kind", "--cache-dir", str(args.out / "cache")]
    _run([*evaluate, "--out", str(work / "eval.json")], log, args.threads)
    metrics = json.loads((work / "eval.json").read_text())
    metrics["bench"] = {
        "variant": name,
        "seed": seed,
        "families": args.families,
        "train_clips": sum(1 for _ in lib.train.open()),
        "test_clips": sum(1 for _ in lib.test.open()),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seconds": round(time.perf_counter() - started, 1),
    }
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _median(runs: list[dict[str, Any]], direction: str, stage: str) -> float:
    return statistics.median(r[direction][stage]["R@1"] for r in runs)


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| variant | runs | t2v broad | t2v two-stage | gain | v2t broad | v2t two-stage | gain "
        "| Δ spread within / between slots (t2v; v2t) | verdicts |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, runs in results.items():
        cells = []
        for d in ("t2v", "v2t"):
            broad, two = _median(runs, d, "broad"), _median(runs, d, "two_stage")
            cells += [f"{broad:.1f}", f"{two:.1f}", f"{two - broad:+.1f}"]
        spreads = "; ".join(
            "/".join(
                f"{statistics.median(r[d]['delta_by_slot'][key] for r in runs):.3f}"
                for key in ("within", "between")
            )
            for d in ("t2v", "v2t")
        )
        verdicts = sorted({r[d]["delta_by_slot"]["verdict"] for r in runs for d in ("t2v", "v2t")})
        lines.append(
            f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {spreads} | {', '.join(verdicts)} |"
        )
    return "\n".join(lines)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/quality.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="working folder (libraries, runs, quality.json)")
    p.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="default: all"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="library and training seeds")
    p.add_argument("--families", type=int, default=160, help="families per library (80%% trained on)")
    p.add_argument("--epochs", type=int, default=18)
    p.add_argument("--batch-size", type=int, default=64, help="the demo recipe's 64")
    p.add_argument("--focus-head", choices=("candidate", "slot"), help="default: the preset's (candidate)")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs at once (on 2 vCPUs one run of 2 threads trains faster)"
    )
    p.add_argument("--threads", type=int, help="torch threads per run (default: torch's; 1 with --jobs > 1)")
    args = p.parse_args(argv)
    if args.jobs > 1 and args.threads is None:
        args.threads = 1
    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.variants}
    todo = [(name, seed) for name in args.variants for seed in args.seeds]

    def one(job: tuple[str, int]) -> tuple[str, int, dict[str, Any]]:
        return (*job, run_one(*job, args))

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for name, seed, metrics in pool.map(one, todo):
            results[name].append(metrics)
            print(
                f"quality: {name} seed {seed}: t2v {metrics['t2v']['broad']['R@1']:.1f} -> "
                f"{metrics['t2v']['two_stage']['R@1']:.1f}, v2t {metrics['v2t']['broad']['R@1']:.1f} -> "
                f"{metrics['v2t']['two_stage']['R@1']:.1f} ({metrics['bench']['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "cpu": _cpu(),
        "seconds": round(time.perf_counter() - started, 1),
        "variants": {n: {"about": VARIANTS[n].about, **asdict(VARIANTS[n])} for n in results},
        "runs": results,
    }
    (args.out / "quality.json").write_text(json.dumps(report, indent=2, default=list) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
