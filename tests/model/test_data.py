"""Manifest and MSR-VTT readers, the decoded-frame cache and the batch sampler."""

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from model.data import FrameCache, UniqueVideoBatchSampler, prepare_clips
from model.manifest import ManifestError, read_manifest, read_msrvtt

MSRVTT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "msrvtt"
needs_msrvtt = pytest.mark.skipif(
    not MSRVTT.is_dir(), reason=f"MSR-VTT annotation files not found at {MSRVTT}"
)


def _write_manifest(folder, rows):
    path = folder / "manifest.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def videos(tmp_path):
    (tmp_path / "clips").mkdir()
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / "clips" / name).write_bytes(b"x")
    return tmp_path


def test_manifest_paths_extra_keys_and_shared_videos(videos):
    absolute = str(videos / "clips" / "b.mp4")
    path = _write_manifest(
        videos,
        [
            {"video": "clips/a.mp4", "caption": "a red square", "family": 3, "kind": "base"},
            {"video": "clips/a.mp4", "caption": " another caption ", "start": 1, "end": 2.5},
            "",
            {"video": absolute, "caption": "a blue circle"},
        ],
    )
    samples = read_manifest(path)
    assert [s.caption for s in samples] == ["a red square", "another caption", "a blue circle"]
    assert samples[0].video_path == (videos / "clips" / "a.mp4").resolve()
    assert samples[0].meta == {"family": 3, "kind": "base"}
    assert (samples[1].start, samples[1].end) == (1.0, 2.5)
    assert samples[0].video_path == samples[1].video_path and samples[0].clip != samples[1].clip
    assert str(samples[2].video_path) == absolute


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"caption": "x"}), '"video"'),
        (json.dumps({"video": "clips/a.mp4", "caption": ""}), "caption"),
        (json.dumps({"video": "clips/a.mp4", "caption": "x", "start": "0:01"}), "numbers"),
        (json.dumps({"video": "clips/a.mp4", "caption": "x", "start": 3, "end": 2}), "after start"),
        (json.dumps({"video": "clips/missing.mp4", "caption": "x"}), "does not exist"),
    ],
)
def test_malformed_lines_name_file_and_line(videos, line, message):
    path = _write_manifest(videos, [{"video": "clips/a.mp4", "caption": "fine"}, line])
    with pytest.raises(ManifestError, match=message) as e:
        read_manifest(path)
    assert f"{path}:2" in str(e.value)


def test_missing_videos_can_be_left_to_the_decoder(videos):
    path = _write_manifest(videos, [{"video": "clips/missing.mp4", "caption": "x"}])
    assert len(read_manifest(path, require_videos=False)) == 1


@needs_msrvtt
def test_msrvtt_1k_a(tmp_path):
    samples = read_msrvtt(MSRVTT, "test-1k-A", videos_dir=tmp_path, require_videos=False)
    assert len(samples) == 1000 and len({s.video_path for s in samples}) == 1000
    assert samples[0].caption == "a person is connecting something to system"
    assert samples[0].video_path.name == "video9770.mp4" and samples[0].start is None
    with pytest.raises(ManifestError, match="1000 MSR-VTT videos .* missing"):
        read_msrvtt(MSRVTT, "test-1k-A", videos_dir=tmp_path)
    for s in samples:
        s.video_path.touch()
    assert len(read_msrvtt(MSRVTT, "test-1k-A", videos_dir=tmp_path)) == 1000


@needs_msrvtt
@pytest.mark.parametrize("split, videos, captions", [("train-9k", 9000, 180_000), ("val", 497, 9940)])
def test_msrvtt_caption_splits(split, videos, captions):
    samples = read_msrvtt(MSRVTT, split, require_videos=False)
    assert len(samples) == captions
    assert len({s.video_path for s in samples}) == videos
    assert Counter(s.video_path for s in samples).most_common(1)[0][1] == 20


def test_msrvtt_errors(tmp_path):
    with pytest.raises(ManifestError, match="unknown MSR-VTT split"):
        read_msrvtt(tmp_path, "test-7k")
    with pytest.raises(ManifestError, match="MSRVTT_JSFUSION_test.csv not found"):
        read_msrvtt(tmp_path, "test-1k-A")


class FakeDecoder:
    """Frames derived from the file's bytes; files whose name starts with 'bad' fail like a corrupt video."""

    def __init__(self):
        self.calls = Counter()

    def __call__(self, path, num_frames, size, start=None, end=None):
        from model.video import VideoDecodeError

        self.calls[Path(path).name] += 1
        if Path(path).name.startswith("bad"):
            raise VideoDecodeError(path, VideoDecodeError.CORRUPT)
        seed = sum(Path(path).read_bytes()) + int(10 * (start or 0))
        return np.random.default_rng(seed).integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)


@pytest.fixture
def library(tmp_path):
    rows = []
    for i in range(4):
        (tmp_path / f"v{i}.mp4").write_bytes(bytes([i + 1]))
        rows += [{"video": f"v{i}.mp4", "caption": f"clip {i} caption {j}"} for j in range(2)]
    (tmp_path / "bad.mp4").write_bytes(b"\0")
    rows.append({"video": "bad.mp4", "caption": "broken"})
    rows.append({"video": "v0.mp4", "caption": "a moment", "start": 1.0, "end": 2.0})
    return read_manifest(_write_manifest(tmp_path, rows))


def test_cache_decodes_each_clip_once_and_skips_failures(tmp_path, library):
    decoder = FakeDecoder()
    cache = FrameCache(tmp_path / "cache", num_frames=3, size=8, decoder=decoder)
    clips = prepare_clips(library, cache, workers=2, progress=False)
    assert decoder.calls == {"v0.mp4": 2, "v1.mp4": 1, "v2.mp4": 1, "v3.mp4": 1, "bad.mp4": 1}
    assert len(clips.samples) == 9 and len(clips.clips) == 5
    (reason,) = clips.failures.values()
    assert "corrupt" in reason
    frames = clips.frames(clips.clip_index[:3])
    assert frames.shape == (3, 3, 8, 8, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames[0], frames[1])  # two captions of one clip
    assert not np.array_equal(frames[0], frames[2])

    again = prepare_clips(library, FrameCache(tmp_path / "cache", 3, 8, decoder=decoder), progress=False)
    assert sum(decoder.calls.values()) == 6, "a second run (and its failures) must come from the cache"
    assert np.array_equal(again.frames([0]), clips.frames([0]))

    other_size = FrameCache(tmp_path / "cache", 3, 16, decoder=decoder)
    prepare_clips(library[:1], other_size, progress=False)
    assert decoder.calls["v0.mp4"] == 3

    stat = os.stat(library[0].video_path)
    os.utime(library[0].video_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    prepare_clips(library[:1], cache, progress=False)
    assert decoder.calls["v0.mp4"] == 4, "a modified file must be decoded again"


def _check_batches(batches, videos, batch_size):
    for b in batches:
        assert len({videos[i] for i in b}) == len(b), "two captions of one video in a batch"
        assert len(b) <= batch_size
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    return flat


def test_sampler_never_pairs_captions_of_one_video():
    videos = [i // 5 for i in range(60)] + [99] * 5  # 12 videos with 5 captions, one with 5 more
    sampler = UniqueVideoBatchSampler(videos, batch_size=8, seed=1, drop_last=False)
    flat = _check_batches(list(sampler), videos, 8)
    assert sorted(flat) == list(range(len(videos)))
    full = UniqueVideoBatchSampler(videos, batch_size=8, seed=1)
    assert all(len(b) == 8 for b in full) and len(full) == len(list(full)) >= 7


def test_sampler_order_depends_on_seed_and_epoch_only():
    videos = list(range(40))
    a, b = UniqueVideoBatchSampler(videos, 8, seed=3), UniqueVideoBatchSampler(videos, 8, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)


def test_groups_share_batches():
    families = [i // 6 for i in range(120)]
    videos = list(range(120))
    grouped = list(UniqueVideoBatchSampler(videos, 24, seed=0, groups=families))
    _check_batches(grouped, videos, 24)
    together = sum(len({families[i] for i in b}) for b in grouped)
    assert together == 20, "with batches a multiple of the family size, every family is in one batch"
    mixed = list(UniqueVideoBatchSampler(videos, 24, seed=0))
    assert sum(len({families[i] for i in b}) for b in mixed) > 40


def test_groups_stay_whole_when_the_batch_is_no_multiple_of_the_group():
    """Hard siblings must meet in the in-batch top-k: no family is cut at a batch boundary (batches may
    then run short by less than a family), and the batches split evenly over processes when asked."""
    families = [i // 6 for i in range(600)] + [100 + i // 4 for i in range(200)]  # 100 of 6, 50 of 4
    videos = list(range(len(families)))
    for epoch in range(3):
        sampler = UniqueVideoBatchSampler(videos, 64, seed=2, groups=families)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        _check_batches(batches, videos, 64)
        assert all(len(b) > 64 - 6 for b in batches)
        home = {}
        for n, b in enumerate(batches):
            for i in b:
                assert home.setdefault(families[i], n) == n, "a family split over two batches"
        assert sum(len(b) for b in batches) >= 0.9 * len(videos)
    even = list(UniqueVideoBatchSampler(videos, 64, seed=2, groups=families, multiple_of=4))
    assert all(len(b) % 4 == 0 for b in even)
    with pytest.raises(ValueError, match="multiple"):
        UniqueVideoBatchSampler(videos, 62, groups=families, multiple_of=4)


def test_a_group_larger_than_a_batch_or_with_repeated_videos_is_split():
    families = [0] * 20 + [1] * 4
    videos = list(range(10)) * 2 + [50, 51, 52, 53]  # family 0: 10 videos with two captions each
    batches = list(UniqueVideoBatchSampler(videos, 8, seed=0, groups=families, drop_last=False))
    flat = _check_batches(batches, videos, 8)
    assert sorted(flat) == list(range(len(videos)))
