"""Benchmark: sampling T frames per window with model.video against decord's plain get_batch."""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.decord_baseline import decord_get_batch
from model.video import iter_segment_frames, probe, sample_times, segment_windows
from synth.generator import write_pattern_video

logger = logging.getLogger(__name__)


def _timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Wall seconds, CPU seconds of this process (all threads) and the result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def bench_file(path: Path, args: argparse.Namespace) -> dict[str, float]:
    info = probe(path)
    windows = segment_windows(info.duration_s, max_segment_s=args.window, window_s=args.window)
    times = np.concatenate([sample_times(a, b, args.frames) for a, b in windows])
    scale = args.size / min(info.width, info.height)
    small = (round(info.width * scale), round(info.height * scale))
    methods: dict[str, Callable[[], object]] = {
        "get_batch": lambda: decord_get_batch(path, times),
        "get_batch_small": lambda: decord_get_batch(path, times, width=small[0], height=small[1]),
        "sampler": lambda: list(iter_segment_frames(path, windows, args.frames, args.size)),
        "sampler_1thread": lambda: list(
            iter_segment_frames(path, windows, args.frames, args.size, decode_threads=1)
        ),
    }
    runs: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.reps):
        for name, fn in methods.items():  # interleaved, so load from others hits every method alike
            wall_s, cpu_s, _ = _timed(fn)
            runs[name].append(wall_s)
            cpu[name].append(cpu_s)
    medians = {name: statistics.median(v) for name, v in runs.items()}
    cpu_medians = {name: statistics.median(v) for name, v in cpu.items()}
    # Same frames? Compare the sampler's crops with decord's frames at the same decode size.
    ours = np.concatenate([s.frames for s in iter_segment_frames(path, windows, args.frames, args.size)])
    ref = decord_get_batch(path, times, width=small[0], height=small[1])
    top, left = (ref.shape[1] - args.size) // 2, (ref.shape[2] - args.size) // 2
    ref = ref[:, top : top + args.size, left : left + args.size]
    diff = float(np.abs(ours.astype(np.int16) - ref).mean())
    lines = [f"{path.name}: {len(windows)} windows x {args.frames} frames, reps={args.reps}"]
    for name, m in medians.items():
        walls = " ".join(f"{x:.3f}" for x in runs[name])
        lines.append(
            f"  {name:16s} wall median {m:6.3f} s (runs {walls})  cpu median {cpu_medians[name]:6.3f} s"
        )
    for ours_name in ("sampler", "sampler_1thread"):
        lines.append(
            f"  {ours_name} speed-up vs get_batch: wall {medians['get_batch'] / medians[ours_name]:.2f}x,"
            f" cpu {cpu_medians['get_batch'] / cpu_medians[ours_name]:.2f}x;"
            f" vs get_batch at decode size: wall {medians['get_batch_small'] / medians[ours_name]:.2f}x,"
            f" cpu {cpu_medians['get_batch_small'] / cpu_medians[ours_name]:.2f}x"
        )
    lines.append(f"  mean |pixel diff| vs get_batch_small frames (different resizers): {diff:.2f}")
    print("\n".join(lines), flush=True)
    return medians


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--gops", default="250,30", help="keyframe intervals to test, comma-separated")
    parser.add_argument(
        "--bframes", default="3", help="B-frames per mini-GOP to test, comma-separated (0: P-only)"
    )
    parser.add_argument("--frames", type=int, default=12, help="frames sampled per window")
    parser.add_argument("--window", type=float, default=15.0, help="window length in seconds")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep generated files here (default: temp)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for gop in (int(g) for g in args.gops.split(",")):
            for bframes in (int(b) for b in args.bframes.split(",")):
                path = (
                    workdir / f"pattern_{args.width}x{args.height}_{args.seconds:g}s_gop{gop}_b{bframes}.mp4"
                )
                if not path.exists():
                    started = time.perf_counter()
                    write_pattern_video(
                        path, args.seconds, args.width, args.height, args.fps, gop=gop, bframes=bframes
                    )
                    print(f"wrote {path.name} in {time.perf_counter() - started:.1f} s")
                bench_file(path, args)


if __name__ == "__main__":
    main()
