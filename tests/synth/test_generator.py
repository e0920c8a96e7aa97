"""synth.generator: a seeded two-event library whose siblings differ in exactly one attribute."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from synth.__main__ import main
from synth.generator import (
    COLOURS,
    KINDS,
    TEMPLATES,
    TIMINGS,
    GeneratorVariant,
    check_timing,
    family_spec,
    generate_library,
    render_clip,
    split_families,
    write_pattern_video,
)

SIZE = 32  # tiny frames keep generation and decoding fast; objects are still 9 px
FRAMES = 36  # 12 fps x 3 s


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lib")
    generate_library(out, families=3, seed=11, holdout=0.34, size=SIZE, workers=1)
    return out


def _all_frames(path: Path) -> np.ndarray:
    # Read with PyAV, not model's decoder: this layer sits below the model.
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.int16)


@dataclass
class _Info:
    width: int
    height: int
    fps: float
    num_frames: int
    duration_s: float


def probe(path: Path) -> _Info:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
        duration = float(container.duration / av.time_base) if container.duration else 0.0
        return _Info(stream.width, stream.height, float(stream.average_rate), frames, duration)


def test_manifest_lines_describe_every_clip(library: Path) -> None:
    lines = _lines(library / "manifest.jsonl")
    assert len(lines) == 3 * len(KINDS)
    for line in lines:
        assert (library / line["video"]).is_file() and not Path(line["video"]).is_absolute()
        assert set(line) >= {"video", "caption", "family", "kind", "attrs"}
    first = lines[3]
    assert first["video"] == "clips/f00000_s3.mp4" and first["kind"] == "motion"
    info = probe(library / first["video"])
    assert (info.width, info.height, info.fps, info.num_frames) == (SIZE, SIZE, 12.0, FRAMES)


def test_same_seed_gives_same_manifest_and_frames(library: Path, tmp_path: Path) -> None:
    main(
        ["--out", str(tmp_path), "--families", "3", "--seed", "11", "--holdout", "0.34", "--size", str(SIZE)]
    )
    assert (tmp_path / "manifest.jsonl").read_text() == (library / "manifest.jsonl").read_text()
    for line in _lines(library / "manifest.jsonl")[:6]:
        np.testing.assert_array_equal(
            _all_frames(tmp_path / line["video"]), _all_frames(library / line["video"])
        )


def test_another_seed_gives_another_library() -> None:
    assert family_spec(0, seed=11) != family_spec(0, seed=12)
    assert family_spec(0, seed=11) == family_spec(0, seed=11)


def test_split_keeps_families_whole(library: Path) -> None:
    train, test = _lines(library / "train.jsonl"), _lines(library / "test.jsonl")
    assert {x["family"] for x in train}.isdisjoint({x["family"] for x in test})
    assert len(test) == len(KINDS) and len(train) == 2 * len(KINDS)
    assert sorted(map(json.dumps, train + test)) == sorted(
        map(json.dumps, _lines(library / "manifest.jsonl"))
    )
    held = split_families(50, seed=3, holdout=0.2)
    assert len(held) == 10 and held == split_families(50, seed=3, holdout=0.2)
    assert held != split_families(50, seed=4, holdout=0.2)


def test_each_sibling_changes_exactly_one_attribute_and_its_caption() -> None:
    for family in range(20):
        clips = family_spec(family, seed=5)
        base = clips[0]
        assert [c["kind"] for c in clips] == list(KINDS)
        assert len({json.dumps(c["events"]) + c["background"] for c in clips}) == len(KINDS)
        for clip in clips[1:]:
            changed = [
                (i, key)
                for i, (a, b) in enumerate(zip(base["events"], clip["events"], strict=True))
                for key in a
                if a[key] != b[key]
            ]
            if clip["kind"] in ("colour", "shape"):
                assert changed == [(clip["changed_event"], clip["kind"])]
            elif clip["kind"] == "motion":
                assert changed == [(clip["changed_event"], "direction")]
            elif clip["kind"] == "order":
                assert clip["events"] == base["events"][::-1]
            else:
                assert not changed and clip["background"] != base["background"]


def test_captions_differ_within_a_family(library: Path) -> None:
    by_family = defaultdict(list)
    for line in _lines(library / "manifest.jsonl"):
        by_family[line["family"]].append(line["caption"])
    for captions in by_family.values():
        assert len(set(captions)) == len(KINDS)


def test_motion_and_order_siblings_reuse_the_base_frames(library: Path) -> None:
    lines = _lines(library / "manifest.jsonl")
    for family in range(3):
        rows = {x["kind"]: x for x in lines if x["family"] == family}
        base = _all_frames(library / rows["base"]["video"])
        half = FRAMES // 2
        e = rows["motion"]["attrs"]["changed_event"]
        expected_motion = base.copy()
        expected_motion[e * half : (e + 1) * half] = base[e * half : (e + 1) * half][::-1]
        expected_order = np.concatenate([base[half:], base[:half]])
        for kind, expected in (("motion", expected_motion), ("order", expected_order)):
            got = _all_frames(library / rows[kind]["video"])
            matched = np.abs(got - expected).mean()  # H.264 is lossy: same pictures, re-encoded
            assert matched < 2.0 and np.abs(got - base).mean() > 2 * matched, kind
            # The 12 frames a model samples are a permutation of the base's: their mean is the same.
            picked = np.arange(12) * 3 + 1
            cost = np.abs(got[picked][:, None] - base[picked][None]).mean(axis=(2, 3, 4))
            assert sorted(cost.argmin(axis=1).tolist()) == list(range(12)) and cost.min(axis=1).max() < 2.5
        # The test can fail: a colour sibling's frames are not the base's.
        colour = _all_frames(library / rows["colour"]["video"])
        assert np.abs(colour - base).max() > 60


def test_rendered_frames_are_exact_before_encoding() -> None:
    clips = family_spec(7, seed=1)
    base, motion, order = (render_clip(c, 64, FRAMES) for c in (clips[0], clips[3], clips[4]))
    half = FRAMES // 2
    e = clips[3]["changed_event"]
    np.testing.assert_array_equal(motion[e * half : (e + 1) * half], base[e * half : (e + 1) * half][::-1])
    np.testing.assert_array_equal(order, base[half:] + base[:half])
    assert sum(not np.array_equal(a, b) for a, b in zip(base, motion, strict=True)) > 0


def test_timing_must_put_samples_mid_frame() -> None:
    assert check_timing(12, 3.0) == 36
    with pytest.raises(ValueError, match="12 x an odd number"):
        check_timing(24, 3.0)


def test_pattern_video_has_requested_gop_and_b_frames(tmp_path: Path) -> None:
    path = write_pattern_video(tmp_path / "p.mp4", 4.0, 64, 48, 30, gop=30, bframes=3)
    info = probe(path)
    assert (info.width, info.height, info.fps, info.num_frames) == (64, 48, 30.0, 120)
    with av.open(str(path)) as container:
        types = [int(f.pict_type) for f in container.decode(video=0)]  # AVPictureType: 1 I, 2 P, 3 B
    assert types.count(1) == 4 and types.count(3) > 40
    with av.open(str(write_pattern_video(tmp_path / "p0.mp4", 1.0, 64, 48, 30, bframes=0))) as container:
        assert 3 not in {int(f.pict_type) for f in container.decode(video=0)}


def test_the_default_variant_is_the_project_library() -> None:
    """Variants draw from their own stream: the default library (and the demo model's data) is unchanged."""
    clips = family_spec(3, seed=0)
    assert [c["kind"] for c in clips] == list(KINDS)
    assert {c["timing"] for c in clips} == {"sequential"} and {c["seconds"] for c in clips} == {None}
    assert family_spec(3, seed=0, variant=GeneratorVariant()) == clips
    # A variant changes what it names and keeps every clip's content.
    wider = family_spec(3, seed=0, variant=GeneratorVariant(timing="overlap", lengths=(5.0,)))
    assert [(c["events"], c["background"]) for c in wider] == [(c["events"], c["background"]) for c in clips]


def test_timings_put_the_events_where_they_say() -> None:
    clip = {**family_spec(2, seed=4)[0]}

    def shows(frame: np.ndarray, event: int) -> bool:
        colour = np.array(COLOURS[clip["events"][event]["colour"]], np.uint8)
        return bool((frame == colour).all(axis=-1).any())

    frames = {t: render_clip({**clip, "timing": t}, 64, FRAMES) for t in TIMINGS}
    seq, overlap, stay = frames["sequential"], frames["overlap"], frames["stay"]
    assert shows(seq[0], 0) and not shows(seq[0], 1) and shows(seq[-1], 1) and not shows(seq[-1], 0)
    assert shows(overlap[FRAMES // 2], 0) and shows(overlap[FRAMES // 2], 1)  # both in the middle third
    assert not shows(overlap[0], 1) and not shows(overlap[-1], 0)
    assert shows(stay[-1], 0) and shows(stay[-1], 1)  # the first object stayed in view
    with pytest.raises(ValueError, match="timing"):
        render_clip({**clip, "timing": "later"}, 64, FRAMES)


def test_a_variant_library_varies_family_size_length_and_held_out_wording(tmp_path: Path) -> None:
    variant = GeneratorVariant(lengths=(3.0, 5.0), family_size=(4, 5), held_out_wording=True)
    summary = generate_library(
        tmp_path, families=6, seed=3, holdout=0.5, size=SIZE, workers=1, variant=variant
    )
    lines = _lines(summary.manifest)
    assert summary.clips == len(lines)
    sizes = defaultdict(int)
    for line in lines:
        sizes[line["family"]] += 1
    assert set(sizes.values()) <= {4, 5}
    lengths = {line["attrs"]["seconds"] for line in lines}
    assert lengths <= {3.0, 5.0} and len(lengths) == 2
    for line in lines:
        assert probe(tmp_path / line["video"]).duration_s == pytest.approx(line["attrs"]["seconds"], abs=0.1)
    held_out = {line["family"] for line in _lines(summary.test)}
    for line in lines:
        wording = line["attrs"]["template"] >= len(TEMPLATES)
        assert wording == (line["family"] in held_out), line  # only the held-out families read differently
    with pytest.raises(ValueError, match="family_size"):
        GeneratorVariant(family_size=(1, 6))
    with pytest.raises(ValueError, match="timing"):
        GeneratorVariant(timing="soon")


def test_cli_makes_a_variant_library(tmp_path: Path) -> None:
    main(
        [
            "--out", str(tmp_path), "--families", "2", "--size", "32", "--workers", "1", "--holdout", "0.5",
            "--timing", "stay", "--family-size", "4", "4",
        ]
    )  # fmt: skip
    lines = _lines(tmp_path / "manifest.jsonl")
    assert len(lines) == 8 and {line["attrs"]["timing"] for line in lines} == {"stay"}
