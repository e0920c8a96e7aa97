"""scripts/apt_install.sh tells an unreachable package registry (tolerated by CI) from any other failure."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "apt_install.sh"
ABSENT = "tvs-no-such-package"

OFFLINE = """#!/bin/sh
if [ "$1" = update ]; then
  echo "W: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  Temporary failure resolving 'deb.debian.org'"
  exit 0
fi
echo "E: Unable to locate package $4"
exit 100
"""
BROKEN = """#!/bin/sh
[ "$1" = update ] && exit 0
echo "E: Unable to locate package tvs-no-such-package"
exit 100
"""
WORKS = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls"
exit 0
"""


def _run(tmp_path: Path, fake_apt: str, *args: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(fake_apt)
    (bin_dir / "apt-get").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(autouse=True)
def _debian_root() -> None:
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian system (no dpkg-query)")
    if os.geteuid() != 0:
        pytest.skip("apt_install.sh installs only as root")


def test_an_unreachable_registry_exits_3_with_a_clear_message(tmp_path):
    r = _run(tmp_path, OFFLINE, ABSENT)
    assert r.returncode == 3, r.stderr
    assert "registry is unreachable" in r.stderr and "Temporary failure resolving" in r.stderr


def test_any_other_failure_exits_1_and_shows_the_log(tmp_path):
    r = _run(tmp_path, BROKEN, ABSENT)
    assert r.returncode == 1, r.stderr
    assert "Unable to locate package" in r.stderr


def test_only_missing_packages_are_installed(tmp_path):
    r = _run(tmp_path, WORKS, "--no-install-recommends", "bash", ABSENT)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "bin" / "calls").read_text().splitlines()
    assert calls == ["update -qq", f"install -y -qq --no-install-recommends {ABSENT}"]


def test_nothing_runs_when_everything_is_installed(tmp_path):
    r = _run(tmp_path, WORKS, "bash")
    assert r.returncode == 0
    assert not (tmp_path / "bin" / "calls").exists()
