"""A bulk run over a folder with broken files indexes every good video and reports each bad one with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from indexer.cli import main
from indexer.synth import write_hostile_files, write_pattern_video

REASONS = {
    "truncated": "truncated or corrupt",
    "truncated_faststart": "truncated or corrupt",
    "zero_byte": "empty (0 bytes)",
    "text": "not a video",
    "audio_only": "no video stream",
    "png": "not a video",
}


def test_bad_files_are_reported_and_good_ones_indexed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lib = tmp_path / "lib"
    hostile = write_hostile_files(lib / "broken")
    assert set(hostile) == set(REASONS)
    for i in range(3):
        write_pattern_video(lib / f"good{i}.mp4", 1.0 + 0.25 * i, 64, 48, 8, gop=8)
    base = ["--data-dir", str(tmp_path / "data"), "--model", "tiny"]
    assert main(["migrate", *base]) == 0

    for attempt in range(2):  # a second run reports the same failures without retrying them
        capsys.readouterr()
        assert main(["add", *base, "--json", str(lib)]) == 1
        report = json.loads(capsys.readouterr().out)
        assert report["files"] == 3 + len(hostile)
        assert (report["indexed"], report["already"]) == ((3, 0) if attempt == 0 else (0, 3))
        failed = {Path(path).stem: reason for path, reason in report["failed"].items()}
        assert set(failed) == set(REASONS)
        for key, reason in failed.items():
            assert REASONS[key] in reason and str(hostile[key]) in reason, (key, reason)

    capsys.readouterr()
    assert main(["add", *base, str(lib / "good0.mp4"), str(hostile["text"])]) == 1
    text = capsys.readouterr().out
    assert "1 failed:" in text and f"{hostile['text']}: cannot decode" in text, (
        "the summary names file and reason"
    )
    assert main(["verify", *base]) == 0
