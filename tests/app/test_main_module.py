"""app.main: importing it builds nothing; `app.main.app` is built on first access; the version is the package's."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, **env},
    )


def test_importing_app_main_reads_no_settings() -> None:
    # Settings that refuse to load (production without a key) do not stop an import, only the app itself.
    done = _python(
        "import app.main as m; print('imported', m._app is None); m.app", TVS_ENV="production", TVS_API_KEY=""
    )
    assert "imported True" in done.stdout, done.stderr
    assert done.returncode != 0 and "TVS_ENV=production needs TVS_API_KEY" in done.stderr


def test_the_module_level_app_is_built_once() -> None:
    done = _python("import app.main as m; a = m.app; print(a is m.app, type(a).__name__)")
    assert done.stdout.split() == ["True", "FastAPI"], done.stderr


def test_the_version_comes_from_the_package_metadata() -> None:
    from app.main import create_app
    from app.settings import Settings

    assert create_app(Settings()).version == metadata.version("tokenbinder-search")
