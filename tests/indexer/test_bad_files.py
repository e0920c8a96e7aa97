"""A bulk run over a folder with broken files indexes every good video and reports each bad one with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from indexer.cli import main
from synth.generator import write_hostile_files, write_pattern_video

# Named as videos and looking like one: taken in, and reported as failed (exit 1) when they do not decode.
FAILED = {
    "truncated": "truncated or corrupt",
    "truncated_faststart": "truncated or corrupt",
    "audio_only": "no video stream",
}
# Named as videos, but their first bytes say otherwise: skipped without opening them in FFmpeg.
SKIPPED = {
    "zero_byte": "empty file",
    "text": "not a video (text/plain)",
    "png": "not a video (image/png)",
}


def test_bad_files_are_reported_and_good_ones_indexed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lib = tmp_path / "lib"
    hostile = write_hostile_files(lib / "broken")
    assert set(hostile) == set(FAILED) | set(SKIPPED)
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
        assert set(failed) == set(FAILED)
        for key, reason in failed.items():
            assert FAILED[key] in reason and str(hostile[key]) in reason, (key, reason)
        assert report["skipped"] == {str(hostile[key]): reason for key, reason in SKIPPED.items()}

    capsys.readouterr()
    assert main(["add", *base, str(lib / "good0.mp4"), str(hostile["text"])]) == 1
    text = capsys.readouterr().out
    assert "1 failed:" in text and f"{hostile['text']}: cannot decode" in text, (
        "the summary names file and reason"
    )
    assert main(["verify", *base]) == 0
