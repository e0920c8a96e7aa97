"""bench/quality.py: one tiny variant run end to end through its command line, and a resumed sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quality_sweep_trains_evaluates_and_reports_a_variant(tmp_path):
    cmd = [sys.executable, "bench/quality.py", "--out", str(tmp_path), "--variants", "wording"]
    cmd += ["--seeds", "3", "--families", "4", "--epochs", "1", "--batch-size", "6"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| wording |"))
    assert row.count("|") == 11
    report = json.loads((tmp_path / "quality.json").read_text())
    (run,) = report["runs"]["wording"]
    assert run["bench"]["seed"] == 3 and run["bench"]["test_clips"] == 6  # one held-out family of 6
    for direction in ("t2v", "v2t"):
        assert run[direction]["two_stage"]["R@10"] == run[direction]["broad"]["R@10"]
        assert run[direction]["delta_by_slot"]["verdict"] in ("inactive", "rank prior", "content")
    held_out = [json.loads(line) for line in (tmp_path / "wording-seed3" / "lib" / "test.jsonl").open()]
    assert all(line["attrs"]["template"] >= 4 for line in held_out)  # the wordings never trained on
    # A finished run is not repeated: the log still holds one training and one evaluation.
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0 and "| wording |" in again.stdout
    commands = [line for line in (tmp_path / "wording-seed3" / "log.txt").open() if line.startswith("$ ")]
    assert len(commands) == 2
