"""Every real clip of the shared test data ingests with the right duration, segment times and thumbnails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from indexer import catalog
from indexer.bulk import add_paths
from indexer.db import make_engine, make_session_factory, session_scope
from indexer.paths import DataDir
from indexer.pipeline import PipelineConfig
from indexer.verify import verify
from model.checkpoint import load_model
from model.video import segment_windows

CLIPS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "real-clips"
DURATION_TOLERANCE_S = 0.15


@pytest.fixture(scope="module")
def manifest() -> dict[str, dict]:
    if not (CLIPS / "manifest.jsonl").is_file():
        pytest.skip(f"the shared real clips are not at {CLIPS.resolve()} (a folder `shared` beside the repo)")
    lines = [json.loads(line) for line in (CLIPS / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return {entry["video"]: entry for entry in lines}


def test_every_real_clip_is_indexed_faithfully(
    manifest: dict[str, dict], migrated_sqlite_url: str, tmp_path
) -> None:
    data = DataDir(tmp_path / "data").ensure()
    factory = make_session_factory(make_engine(migrated_sqlite_url))
    model = load_model("tiny")
    # Windows of 4 s beyond 6 s give the longer clips several segments, so times are checked too.
    config = PipelineConfig(max_segment_s=6.0, window_s=4.0)
    report = add_paths(factory, data, model, [CLIPS], config=config)
    assert report.failed == {} and report.indexed == len(manifest)
    # The folder's one other file is named with its reason, not indexed and not silently dropped.
    assert {Path(path).name: why for path, why in report.skipped.items()} == {
        "manifest.jsonl": "not a video (text/plain)"
    }
    assert report.files == len(manifest) + 1

    with session_scope(factory) as session:
        videos, _ = catalog.list_videos(session, limit=1000)
        for video in videos:
            expected = manifest[video.filename]
            assert video.status == "ready"
            assert video.duration_s == pytest.approx(expected["duration_s"], abs=DURATION_TOLERANCE_S), (
                video.filename
            )
            assert (video.width, video.height) == (expected["width"], expected["height"]), video.filename
            segments = catalog.segments_for_video(session, video.id, model.model_id)
            windows = segment_windows(video.duration_s, config.max_segment_s, config.window_s)
            assert [(s.ordinal, s.start_s, s.end_s) for s in segments] == [
                (i, pytest.approx(a), pytest.approx(b)) for i, (a, b) in enumerate(windows)
            ], video.filename
            for segment in segments:
                with Image.open(data.root / segment.thumbnail) as thumb:
                    assert thumb.format == "JPEG" and max(thumb.size) <= 320
                    # The thumbnail keeps the displayed aspect ratio (portrait stays portrait).
                    assert thumb.size[0] / thumb.size[1] == pytest.approx(
                        video.width / video.height, rel=0.03
                    )
    assert verify(data, factory, model.model_id).ok
