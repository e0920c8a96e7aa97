"""`python -m synth`: the one command line of the sample-library generator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_python_m_synth_writes_a_sample_library(tmp_path: Path) -> None:
    out_dir = tmp_path / "sample"
    args = ["--out", str(out_dir), "--families", "1", "--size", "32", "--fps", "4", "--seconds", "3"]
    done = subprocess.run(
        [sys.executable, "-m", "synth", *args, "--workers", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["clips"] == 6
    assert len(list((out_dir / "clips").glob("*.mp4"))) == 6 and (out_dir / "manifest.jsonl").is_file()
    assert "wrote 6 clips" in done.stderr


def test_families_is_required(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "synth", "--out", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "--families" in done.stderr
