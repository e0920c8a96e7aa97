"""Real service processes for tests: `uvicorn app.main:app` and `indexer worker`, each logging to a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from helpers.ports import free_port

START_TIMEOUT_S = 120.0


def _env(data_dir: Path, db_url: str, extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "TVS_DATA_DIR": str(data_dir), "TVS_DATABASE_URL": db_url, **extra}


def start_api(data_dir: Path, db_url: str, log: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    """`uvicorn app.main:app` on a free port with the tiny model; returns (process, base URL)."""
    port = free_port()
    settings = {"TVS_MODEL": "tiny", "TVS_FOLLOW_INTERVAL_S": "0.25", **env}
    cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=_env(data_dir, db_url, settings), stdout=out, stderr=subprocess.STDOUT
        )
    return proc, f"http://127.0.0.1:{port}"


def start_worker(data_dir: Path, db_url: str, log: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """`indexer worker -v` (claims are logged) with the tiny model and extra CLI arguments."""
    cmd = [sys.executable, "-m", "indexer", "worker", "-v", "--model", "tiny", *args]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=_env(data_dir, db_url, env), stdout=out, stderr=subprocess.STDOUT)


def wait_ready(
    proc: subprocess.Popen[bytes], base: str, log: Path, timeout_s: float = START_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{base} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{base} did not become ready:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM (the service and the worker finish what they hold), then SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)
