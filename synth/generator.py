"""A seeded sample library of two-event clips whose captions hinge on colour, shape, background, motion and order."""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synth.media import encode_frames, write_hostile_files, write_pattern_video

logger = logging.getLogger(__name__)

COLOURS = {
    "red": (220, 40, 40),
    "yellow": (235, 210, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 210),
    "blue": (40, 70, 230),
    "purple": (160, 60, 200),
}
SHAPES = ("square", "circle", "triangle", "cross")
BACKGROUNDS = ("white", "black", "grey", "striped", "checkered")
DIRECTIONS = ("left", "right", "up", "down")
REVERSE = {"left": "right", "right": "left", "up": "down", "down": "up"}
# One sibling per kind, in file order: f00012_s3.mp4 is family 12's motion sibling.
KINDS = ("base", "colour", "shape", "motion", "order", "background")
TEMPLATES = (
    "a {c1} {s1} moves {d1}, then a {c2} {s2} moves {d2}, on a {bg} background",
    "on a {bg} background, a {c1} {s1} moves {d1} and then a {c2} {s2} moves {d2}",
    "first a {c1} {s1} moves {d1}, then a {c2} {s2} moves {d2}; the background is {bg}",
    "a {c1} {s1} goes {d1}, followed by a {c2} {s2} going {d2}, over a {bg} background",
)
# Other wordings of the same captions, with the same content words in other sentence shapes: a variant of
# the library (GeneratorVariant.held_out_wording) captions its held-out families with these only, so a
# model is tested on phrasings it never trained on.
HELD_OUT_TEMPLATES = (
    "{bg} background: a {c1} {s1} moves {d1}, and after it a {c2} {s2} moves {d2}",
    "a {c1} {s1} that goes {d1} is followed by a {c2} {s2} that goes {d2}, the background {bg}",
)
# Evaluation samples this many frames at bin centres; the clip length must make them land mid-frame.
EVAL_FRAMES = 12
OBJECT_FRACTION = 0.28  # object side / frame side: still clearly visible at 64 px
# When the two events happen (GeneratorVariant.timing):
#   sequential: the first object crosses during the first half and leaves, the second during the second half;
#   overlap: the first moves during the first two thirds, the second during the last two (both in the middle);
#   stay: as sequential, but the first object stays where it stopped while the second moves.
TIMINGS = ("sequential", "overlap", "stay")


@dataclass(frozen=True)
class GeneratorVariant:
    """What a variant of the library changes, so a model can be tested on data it was not tuned on.

    The default is the project's library. `timing` is one of TIMINGS or "mixed" (a seeded choice per
    family among overlap and stay); `lengths` are clip lengths in seconds drawn per clip (empty: the
    library's one length); `family_size` is the (min, max) clips per family, base included (6: every
    kind); `held_out_wording` captions the held-out families with HELD_OUT_TEMPLATES only.
    """

    timing: str = "sequential"
    lengths: tuple[float, ...] = ()
    family_size: tuple[int, int] = (len(KINDS), len(KINDS))
    held_out_wording: bool = False

    def __post_init__(self) -> None:
        if self.timing not in (*TIMINGS, "mixed"):
            raise ValueError(f"timing must be one of {(*TIMINGS, 'mixed')}, got {self.timing!r}")
        lo, hi = self.family_size
        if not 2 <= lo <= hi <= len(KINDS):
            raise ValueError(f"family_size must be 2 <= min <= max <= {len(KINDS)}, got {self.family_size}")


@dataclass(frozen=True)
class LibrarySummary:
    out_dir: Path
    manifest: Path
    train: Path
    test: Path
    clips: int
    families: int
    train_families: int
    test_families: int
    seconds: float


def check_timing(fps: int, seconds: float) -> int:
    """Frames per clip, if 12 bin-centre samples land mid-frame, six per event; else ValueError."""
    frames = round(fps * seconds)
    per_bin = frames / EVAL_FRAMES
    if abs(fps * seconds - frames) > 1e-9 or per_bin != int(per_bin) or int(per_bin) % 2 == 0:
        raise ValueError(
            f"fps x seconds = {fps * seconds:g} frames; it must be {EVAL_FRAMES} x an odd number so that "
            f"{EVAL_FRAMES} evenly sampled frames land mid-frame (e.g. 12 fps x 3 s = 36 frames)"
        )
    return frames


def family_spec(
    family: int, seed: int, variant: GeneratorVariant | None = None, held_out: bool = False
) -> list[dict[str, Any]]:
    """The clips of a family (base first), each as {"kind", "events", "background", "timing", ...}.

    The default variant gives all six kinds; a variant's choices come from a second seeded stream, so the
    default library stays the same whatever variants exist.
    """
    variant = variant or GeneratorVariant()
    clips = _family_clips(family, seed)
    extra = np.random.default_rng([seed, family, 1])
    lo, hi = variant.family_size
    count = int(extra.integers(lo, hi + 1))
    if count < len(clips):
        keep = sorted(int(i) for i in extra.choice(np.arange(1, len(clips)), size=count - 1, replace=False))
        clips = [clips[0], *(clips[i] for i in keep)]
    timing = variant.timing if variant.timing != "mixed" else str(extra.choice(["overlap", "stay"]))
    if variant.held_out_wording and held_out:
        template = int(extra.integers(len(HELD_OUT_TEMPLATES)))
    for clip in clips:
        clip["timing"] = timing
        clip["seconds"] = float(extra.choice(variant.lengths)) if variant.lengths else None
        if variant.held_out_wording and held_out:
            clip["template"] = len(TEMPLATES) + template  # an index into TEMPLATES + HELD_OUT_TEMPLATES
    return clips


def _family_clips(family: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng([seed, family])
    names = list(COLOURS)
    c1, c2 = (str(c) for c in rng.choice(names, size=2, replace=False))
    s1, s2 = (str(s) for s in rng.choice(SHAPES, size=2))
    d1, d2 = (str(d) for d in rng.choice(DIRECTIONS, size=2))
    base: dict[str, Any] = {
        "events": [
            {"colour": c1, "shape": s1, "direction": d1},
            {"colour": c2, "shape": s2, "direction": d2},
        ],
        "background": str(rng.choice(BACKGROUNDS)),
        "template": int(rng.integers(len(TEMPLATES))),
    }
    clips = [{"kind": "base", "changed_event": None, **base}]
    for kind in KINDS[1:]:
        clip: dict[str, Any] = {"kind": kind, "changed_event": None, **copy.deepcopy(base)}
        events: list[dict[str, str]] = clip["events"]
        e = int(rng.integers(2))
        if kind == "colour":
            used = {ev["colour"] for ev in events}
            events[e]["colour"] = str(rng.choice([c for c in names if c not in used]))
        elif kind == "shape":
            used = {ev["shape"] for ev in events}
            events[e]["shape"] = str(rng.choice([s for s in SHAPES if s not in used]))
        elif kind == "motion":
            events[e]["direction"] = REVERSE[events[e]["direction"]]
        elif kind == "order":
            events.reverse()
        else:
            clip["background"] = str(rng.choice([b for b in BACKGROUNDS if b != base["background"]]))
        if kind in ("colour", "shape", "motion"):
            clip["changed_event"] = e
        clips.append(clip)
    return clips


def caption(clip: dict[str, Any]) -> str:
    (e1, e2), bg = clip["events"], clip["background"]
    return (TEMPLATES + HELD_OUT_TEMPLATES)[clip["template"]].format(
        c1=e1["colour"], s1=e1["shape"], d1=e1["direction"],
        c2=e2["colour"], s2=e2["shape"], d2=e2["direction"], bg=bg,
    )  # fmt: skip


def _background(name: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    band = max(2, size // 8)
    level = {
        "white": np.full((size, size), 245),
        "black": np.full((size, size), 15),
        "grey": np.full((size, size), 128),
        "striped": np.where((xx // band) % 2 == 0, 200, 70),
        "checkered": np.where(((xx // band) + (yy // band)) % 2 == 0, 220, 90),
    }[name]
    return np.repeat(level[..., None], 3, axis=2).astype(np.uint8)


def _mask(shape: str, side: int) -> np.ndarray:
    yy, xx = (np.mgrid[0:side, 0:side] + 0.5) / side - 0.5  # centred coordinates in [-0.5, 0.5)
    if shape == "square":
        return (np.abs(xx) < 0.42) & (np.abs(yy) < 0.42)
    if shape == "circle":
        return xx**2 + yy**2 < 0.46**2
    if shape == "triangle":
        return (yy > -0.45) & (yy < 0.45) & (np.abs(xx) < (yy + 0.45) * 0.5)
    if shape == "cross":
        return ((np.abs(xx) < 0.15) | (np.abs(yy) < 0.15)) & (np.abs(xx) < 0.48) & (np.abs(yy) < 0.48)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _event_positions(event: dict[str, str], size: int, frames: int) -> list[tuple[int, int]]:
    """Top-left corners of one object crossing the frame in a straight line; left/up reverse right/down."""
    side = max(8, round(OBJECT_FRACTION * size))
    lo, hi, mid = size // 16, size - side - size // 16, (size - side) // 2
    out = []
    for k in range(frames):
        pos = round(lo + (hi - lo) * k / max(1, frames - 1))
        out.append((pos, mid) if event["direction"] in ("left", "right") else (mid, pos))
    return out[::-1] if event["direction"] in ("left", "up") else out


def _draw(image: np.ndarray, event: dict[str, str], corner: tuple[int, int]) -> None:
    side = max(8, round(OBJECT_FRACTION * image.shape[0]))
    x, y = corner
    image[y : y + side, x : x + side][_mask(event["shape"], side)] = np.array(
        COLOURS[event["colour"]], np.uint8
    )


def render_event(event: dict[str, str], background: np.ndarray, frames: int) -> list[np.ndarray]:
    """One object crossing the frame in a straight line; left/up are exactly right/down reversed."""
    out = []
    for corner in _event_positions(event, background.shape[0], frames):
        image = background.copy()
        _draw(image, event, corner)
        out.append(image)
    return out


def render_clip(clip: dict[str, Any], size: int, frames: int) -> list[np.ndarray]:
    """The clip's frames; its "timing" (TIMINGS, default sequential) says when each event happens."""
    background = _background(clip["background"], size)
    timing = clip.get("timing") or "sequential"
    first, second = clip["events"]
    half = frames // 2
    if timing == "sequential":
        return [f for event in clip["events"] for f in render_event(event, background, half)]
    if timing == "overlap":
        spans = [(0, round(2 * frames / 3)), (round(frames / 3), frames)]
    elif timing == "stay":
        spans = [(0, half), (half, frames)]
    else:
        raise ValueError(f"unknown timing {timing!r}; expected one of {TIMINGS}")
    paths = [_event_positions(e, size, b - a) for e, (a, b) in zip((first, second), spans, strict=True)]
    out = []
    for f in range(frames):
        image = background.copy()
        for n, (event, (a, b)) in enumerate(zip((first, second), spans, strict=True)):
            if a <= f < b:
                _draw(image, event, paths[n][f - a])
            elif f >= b and n == 0 and timing == "stay":
                _draw(image, event, paths[n][-1])  # the first object stays where it stopped
        out.append(image)
    return out


def _write_family(
    job: tuple[int, int, Path, int, int, float, GeneratorVariant, bool],
) -> list[dict[str, Any]]:
    family, seed, out_dir, size, fps, seconds, variant, held_out = job
    lines = []
    for clip in family_spec(family, seed, variant, held_out):
        frames = check_timing(fps, clip["seconds"] or seconds)
        sibling = KINDS.index(clip["kind"])  # the file name keeps the kind's number: f00012_s3 is motion
        rel = f"clips/f{family:05d}_s{sibling}.mp4"
        encode_frames(out_dir / rel, render_clip(clip, size, frames), fps)
        attrs = {key: clip[key] for key in ("events", "background", "template", "changed_event")}
        if variant != GeneratorVariant():
            attrs.update(timing=clip["timing"], seconds=clip["seconds"] or seconds)
        lines.append(
            {"video": rel, "caption": caption(clip), "family": family, "kind": clip["kind"], "attrs": attrs}
        )
    return lines


def split_families(families: int, seed: int, holdout: float) -> set[int]:
    """The held-out (test) family ids: a seeded choice of round(holdout x families), whole families."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    count = round(holdout * families)
    if holdout > 0 and families >= 2:
        count = min(max(count, 1), families - 1)
    order = np.random.default_rng(seed).permutation(families)
    return {int(f) for f in order[:count]}


def generate_library(
    out_dir: str | Path,
    families: int,
    seed: int,
    holdout: float = 0.2,
    size: int = 128,
    fps: int = 12,
    seconds: float = 3.0,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    variant: GeneratorVariant | None = None,
) -> LibrarySummary:
    """Write out_dir/clips/*.mp4, manifest.jsonl (all), train.jsonl and test.jsonl (split by family)."""
    if families < 1 or size < 16 or size % 2:
        raise ValueError(f"need families >= 1 and an even size >= 16, got {families} and {size}")
    variant = variant or GeneratorVariant()
    for length in variant.lengths or (seconds,):
        check_timing(fps, length)
    test_ids = split_families(families, seed, holdout)
    out = Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [(f, seed, out, size, fps, seconds, variant, f in test_ids) for f in range(families)]
    results: list[list[dict[str, Any]]] = []
    if workers <= 1:
        for job in jobs:
            results.append(_write_family(job))
            if progress:
                progress(len(results), families)
    else:
        # spawn: forking a parent that may hold torch or encoder threads is not safe.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for lines in pool.map(_write_family, jobs, chunksize=max(1, min(16, families // (4 * workers)))):
                results.append(lines)
                if progress:
                    progress(len(results), families)
    paths = {name: out / f"{name}.jsonl" for name in ("manifest", "train", "test")}
    clips = 0
    with paths["manifest"].open("w") as m, paths["train"].open("w") as tr, paths["test"].open("w") as te:
        for lines in results:
            clips += len(lines)
            for line in lines:
                text = json.dumps(line) + "\n"
                m.write(text)
                (te if line["family"] in test_ids else tr).write(text)
    elapsed = time.perf_counter() - started
    return LibrarySummary(
        out, paths["manifest"], paths["train"], paths["test"], clips, families,
        families - len(test_ids), len(test_ids), elapsed,
    )  # fmt: skip


__all__ = [
    "GeneratorVariant",
    "LibrarySummary",
    "caption",
    "family_spec",
    "generate_library",
    "render_clip",
    "split_families",
    "write_hostile_files",
    "write_pattern_video",
]
