"""Benchmark: ingestion throughput (decode alone, encode alone, the overlapped pipeline) and peak memory."""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.decord_baseline import decord_get_batch
from indexer.bulk import add_paths
from indexer.db import make_engine, make_session_factory, upgrade_database
from indexer.paths import DataDir
from indexer.pipeline import Encoder, PipelineConfig, read_video
from model.checkpoint import load_model
from model.inference import prepare_for_inference
from model.tokenbinder import TokenBinder
from model.video import iter_segment_frames, probe, sample_times, segment_windows
from synth.generator import write_pattern_video

logger = logging.getLogger(__name__)

REAL_CLIPS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real-clips"


def _model(spec: str) -> TokenBinder:
    return prepare_for_inference(load_model(spec))


def _index(model: TokenBinder, files: list[Path], work: Path, config: PipelineConfig) -> dict[str, float]:
    """`indexer add` in this process (hash, decode || encode, write) into a fresh data directory."""
    data = DataDir(work).ensure()
    upgrade_database(data.database_url)
    factory = make_session_factory(make_engine(data.database_url))
    report = add_paths(factory, data, model, files, config=config)
    if report.failed:
        raise RuntimeError(f"indexing failed: {report.failed}")
    frames = report.segments * model.config.num_frames
    return {"seconds": report.seconds, "segments": report.segments, "frames": frames}


def stage_rates(model: TokenBinder, files: list[Path], work: Path, config: PipelineConfig) -> list[list[str]]:
    t, size = model.config.num_frames, model.config.image_size
    started, decoded = time.perf_counter(), []
    for path in files:
        decoded += [s.frames for s in read_video(path, t, size, config)[2]]
    decode_s = time.perf_counter() - started
    encoder = Encoder(model)
    encoder.encode(np.stack(decoded[: config.batch_size]))  # warm-up
    started = time.perf_counter()
    for i in range(0, len(decoded), config.batch_size):
        encoder.encode(np.stack(decoded[i : i + config.batch_size]))
    encode_s = time.perf_counter() - started
    e2e = _index(model, files, work, config)
    frames = len(decoded) * t
    slower = min(frames / decode_s, frames / encode_s)
    e2e_fps = e2e["frames"] / e2e["seconds"]
    return [
        [
            "decode only (reader)",
            f"{decode_s:.1f}",
            f"{len(decoded) / decode_s:.2f}",
            f"{frames / decode_s:.1f}",
            "",
        ],
        [
            "encode only (encoder)",
            f"{encode_s:.1f}",
            f"{len(decoded) / encode_s:.2f}",
            f"{frames / encode_s:.1f}",
            "",
        ],
        [
            "end to end (`indexer add`, overlapped)",
            f"{e2e['seconds']:.1f}",
            f"{e2e['segments'] / e2e['seconds']:.2f}",
            f"{e2e_fps:.1f}",
            f"{100 * e2e_fps / slower:.0f}% of the slower stage",
        ],
    ]


def sampler_vs_decord(files: list[Path], frames: int, size: int, reps: int) -> list[list[str]]:
    rows = []
    for path in files:
        info = probe(path)
        windows = segment_windows(info.duration_s, 30.0, 15.0)
        times = np.concatenate([sample_times(a, b, frames) for a, b in windows])
        runs: dict[str, list[float]] = {"sampler": [], "get_batch": []}
        for _ in range(reps):  # interleaved, so load from other work hits both alike
            for name, fn in (
                ("sampler", lambda p=path, w=windows: list(iter_segment_frames(p, w, frames, size))),
                ("get_batch", lambda p=path, ts=times: decord_get_batch(p, ts)),
            ):
                started = time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - started)
        ours, theirs = statistics.median(runs["sampler"]), statistics.median(runs["get_batch"])
        rows.append([path.name, str(len(times)), f"{ours:.2f}", f"{theirs:.2f}", f"{theirs / ours:.2f}x"])
    return rows


def peak_rss(path: Path, spec: str, config: PipelineConfig) -> dict[str, float]:
    """Index one file in a fresh process and report its peak resident memory."""
    cmd = [sys.executable, __file__, "--rss-child", str(path), "--model", spec]
    cmd += ["--batch-size", str(config.batch_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space, which exec replaces;
    ru_maxrss survives exec on Linux, so a child forked from a large parent would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_child(path: Path, spec: str, config: PipelineConfig) -> None:
    model = _model(spec)
    with tempfile.TemporaryDirectory() as work:
        result = _index(model, [path], Path(work) / "data", config)
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default="ViT-B-32", help="preset or checkpoint (default: ViT-B-32, random weights)"
    )
    parser.add_argument(
        "--clips", type=Path, default=REAL_CLIPS, help="folder of clips (default: the real clips)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="segments per encoder forward")
    parser.add_argument("--reps", type=int, default=3, help="repetitions for the sampler comparison")
    parser.add_argument("--long-minutes", type=float, default=10.0, help="length of the peak-memory video")
    parser.add_argument("--long-fps", type=float, default=24.0)
    parser.add_argument("--skip-rss", action="store_true", help="leave out the peak-memory measurement")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = PipelineConfig(batch_size=args.batch_size)
    if args.rss_child:
        _rss_child(args.rss_child, args.model, config)
        return
    print(f"`{' '.join(['python', *sys.argv])}`  (torch threads: {torch.get_num_threads()})\n")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gop250 = write_pattern_video(work / "720p_gop250.mp4", 60.0, 1280, 720, 30, gop=250)
        gop30 = write_pattern_video(work / "720p_gop30.mp4", 60.0, 1280, 720, 30, gop=30)
        clips = (
            sorted(p for p in args.clips.glob("*") if p.suffix in {".mp4", ".mpg"})
            if args.clips.is_dir()
            else []
        )
        files = [*clips, gop250, gop30]
        model = _model(args.model)
        t, size = model.config.num_frames, model.config.image_size
        print(f"## Throughput: {len(clips)} clips from {args.clips.resolve()} + two 60 s 720p H.264 files")
        print(
            f"model {args.model} ({model.model_id}, {model.dtype}), T={t}, {size} px, batch {args.batch_size}\n"
        )
        rows = stage_rates(model, files, work / "e2e", config)
        print(_table(["stage", "seconds", "segments/s", "frames/s", "overlap"], rows) + "\n")

        print(
            f"## Sampling T={t} frames per 15 s window at {size} px vs decord get_batch (median of {args.reps})\n"
        )
        rows = sampler_vs_decord([gop250, gop30], t, size, args.reps)
        print(_table(["file", "frames", "sampler s", "get_batch s", "speed-up"], rows) + "\n")

        if not args.skip_rss:
            seconds = args.long_minutes * 60
            started = time.perf_counter()
            long = write_pattern_video(work / "1080p_long.mp4", seconds, 1920, 1080, args.long_fps, gop=250)
            made = time.perf_counter() - started
            rss = peak_rss(long, args.model, config)
            print(
                f"## Peak memory: indexing a {args.long_minutes:g}-minute 1080p {args.long_fps:g} fps video\n"
            )
            row = [f"{rss['peak_rss_mb']:.0f}", f"{rss['seconds']:.1f}", str(rss["segments"]), f"{made:.0f}"]
            print(_table(["peak RSS MB", "index seconds", "segments", "file written in s"], [row]))


if __name__ == "__main__":
    main()
