"""`indexer watch` in a subprocess: a file copied in slowly is indexed once, a change re-indexes it, a delete
removes it, a non-video is skipped, and SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from indexer.cli import main
from synth.generator import write_pattern_video

REPO = Path(__file__).resolve().parents[2]


class _Lines:
    """The watcher's stdout, line by line, read in a thread so a wait can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stdout is not None
        threading.Thread(
            target=lambda: [self.queue.put(line.rstrip()) for line in proc.stdout], daemon=True
        ).start()

    def wait_for(self, prefix: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting {prefix!r} within {timeout} s; saw {self.seen}")

    def drain(self) -> list[str]:
        while not self.queue.empty():
            self.seen.append(self.queue.get())
        return self.seen


def test_watch_indexes_changes_and_deletes_and_stops_on_sigterm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, data = tmp_path / "inbox", tmp_path / "data"
    folder.mkdir()
    clip = write_pattern_video(tmp_path / "made.mp4", 1.5, 64, 48, 8, gop=8).read_bytes()
    other = write_pattern_video(tmp_path / "other.mp4", 2.0, 64, 48, 8, gop=8).read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("TVS_MODEL", "TVS_DATABASE_URL"):
        env.pop(name, None)
        monkeypatch.delenv(name, raising=False)
    argv = [sys.executable, "-m", "indexer", "watch", str(folder), "--data-dir", str(data), "--model", "tiny",
            "--settle-s", "0.6", "--debounce-ms", "100"]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    lines = _Lines(proc)
    try:
        lines.wait_for("watching", timeout=300)  # a loaded machine takes long to import torch
        target = folder / "beach.mp4"
        with open(target, "wb") as f:  # copied in three slow pieces: must be indexed once, when whole
            for start in range(0, len(clip), len(clip) // 3 + 1):
                f.write(clip[start : start + len(clip) // 3 + 1])
                f.flush()
                time.sleep(0.3)
        queued = lines.wait_for("queued")
        assert str(target) in queued
        assert "1 segments" in lines.wait_for("indexed") and str(target) in lines.seen[-1]
        (folder / "notes.txt").write_text("not a video\n")
        assert "not a video" in lines.wait_for("skipped")
        target.write_bytes(other)  # new contents: indexed again, the old video removed
        replaced = lines.wait_for("removed")
        assert "replaced by its new contents" in replaced
        lines.wait_for("indexed")
        target.unlink()
        assert str(target) in lines.wait_for("removed")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
        lines.wait_for("stopped", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = lines.drain()
    assert sum(line.startswith("indexed") for line in events) == 2, events
    assert sum(line.startswith("queued") for line in events) == 2, events
    assert main(["stats", "--json", "--data-dir", str(data), "--model", "tiny"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["segments"] == 0 and counts["videos"]["deleted"] == 2 and counts["videos"]["ready"] == 0
    assert counts["jobs"]["ready"] == 2
