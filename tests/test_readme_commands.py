"""The README's "Quick start" and "Using your own videos" blocks, run line by line on a fresh data directory.

Only paths change: `~/Videos` becomes a folder of generated clips, `./data` (written, or the default the
CLI falls back to) a temporary data directory, `.venv/` the virtual environment running the tests, the
port a free one. Lines that a test cannot run as written are in NOT_AS_WRITTEN, each with the reason.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from helpers.ports import free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV = Path(sys.executable).parent.parent
READY_TIMEOUT_S = 600.0  # `make demo` generates and indexes 48 clips before it serves

# A line that cannot run in a test as written -> what runs instead (None: nothing), and why.
NOT_AS_WRITTEN: dict[str, tuple[str | None, str]] = {
    "make test": (None, "the whole test suite, which this test is part of"),
    "make demo": (
        f"make -o {VENV}/.installed demo VENV={VENV}",
        "installing (the .venv target) is not a test's business: make skips it and uses the tests' environment",
    ),
}
# Commands that serve until stopped: started in the background, searched, then stopped.
SERVERS = ("make demo", "uvicorn")


def bash_block(heading: str) -> list[str]:
    """The command lines (comments stripped) of the first ```bash block under the `## heading`."""
    text = README.read_text()
    section = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert section, f"README.md has no '## {heading}' section"
    block = re.search(r"^```bash\n(.*?)^```", section.group(1), flags=re.M | re.S)
    assert block, f"README.md's '## {heading}' has no ```bash block"
    lines = [line.split(" #", 1)[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


class Shell:
    """Runs README lines in the repository root, with the paths pointing into tmp_path."""

    def __init__(self, tmp_path: Path, videos: Path | None = None) -> None:
        self.tmp_path, self.videos, self.port = tmp_path, videos, free_port()
        self.data = tmp_path / "data"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TVS_")}  # the README's defaults
        # The tests' checkout first, should the environment's package be installed from another one.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        env["TVS_DATA_DIR"] = str(self.data)  # where the default ./data would be
        env["TVS_PORT"] = str(self.port)  # `make demo`'s port
        self.env = env

    def rewrite(self, line: str) -> str:
        line = NOT_AS_WRITTEN.get(line, (line, ""))[0] or ""
        line = line.replace(".venv/bin/", f"{VENV}/bin/").replace("./data", str(self.data))
        line = line.replace("--port 8000", f"--port {self.port}")
        if self.videos is not None:
            line = line.replace("~/Videos", str(self.videos))
        return line

    def run(self, line: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["bash", "-c", line], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, (
            f"{line!r} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
        return result

    @contextmanager
    def serving(self, line: str) -> Iterator[str]:
        log = (self.tmp_path / "server.log").open("w")
        proc = subprocess.Popen(
            ["bash", "-c", line], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{self.port}"
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                assert proc.poll() is None, f"{line!r} exited {proc.returncode}:\n{_tail(self.tmp_path)}"
                assert time.monotonic() < deadline, f"{line!r} not ready:\n{_tail(self.tmp_path)}"
                try:
                    if httpx.get(f"{base}/health", timeout=5).json().get("ready"):
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            yield base
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as the README says
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()


def _tail(tmp_path: Path) -> str:
    return (tmp_path / "server.log").read_text()[-3000:]


def run_block(shell: Shell, lines: list[str], query: str) -> list[str]:
    """Run each line; a server is searched for `query` and stopped. Returns the lines that ran."""
    ran = []
    for original in lines:
        line = shell.rewrite(original)
        if not line:
            continue
        ran.append(line)
        if not any(server in original for server in SERVERS):
            shell.run(line)
            continue
        with shell.serving(line) as base:
            r = httpx.post(f"{base}/search", json={"query": query, "limit": 3}, timeout=60)
            # Hits, as results or (below the model's calibrated cut-off: a short query) as best guesses.
            body = r.json() if r.status_code == 200 else {}
            assert body.get("results") or body.get("best_guesses"), (line, r.status_code, r.text[:300])
    return ran


def test_every_line_the_test_does_not_run_as_written_is_in_a_block() -> None:
    lines = bash_block("Quick start") + bash_block("Using your own videos")
    assert set(NOT_AS_WRITTEN) <= set(lines), "an allowlist entry for a line the README no longer has"


@pytest.mark.slow
def test_using_your_own_videos(tmp_path: Path) -> None:
    from synth.generator import generate_library

    videos = tmp_path / "Videos"
    summary = generate_library(videos, families=1, seed=3, holdout=0.0, size=32, seconds=1.0, workers=1)
    captions = [json.loads(line)["caption"] for line in summary.manifest.read_text().splitlines()]
    shell = Shell(tmp_path, videos)
    lines = bash_block("Using your own videos")
    ran = run_block(shell, lines, captions[0])
    assert len(ran) == len(lines) >= 3 and any("uvicorn" in line for line in ran)
    assert (shell.data / "catalog.db").is_file(), "the commands used the rewritten data directory"
    assert not any(part in " ".join(ran) for part in ("~/Videos", "./data", " .venv/")), ran


@pytest.mark.slow
def test_quick_start(tmp_path: Path) -> None:
    shell = Shell(tmp_path)
    # `make demo` titles each clip by its caption; any caption of the generated world finds something.
    ran = run_block(shell, bash_block("Quick start"), "a red square moves left")
    assert any("demo" in line for line in ran) and not any(line.startswith("make test") for line in ran)
    assert (shell.data / "catalog.db").is_file()
