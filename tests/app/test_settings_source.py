"""One settings source: the API and the `indexer` CLI resolve the same model and read the same .env, from any cwd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from indexer.cli import main as indexer
from synth.generator import write_pattern_video


@pytest.mark.slow  # the demo model loaded twice, a clip indexed
def test_an_api_started_from_another_directory_serves_the_model_the_cli_indexed_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TVS_MODEL", raising=False)
    data = tmp_path / "data"
    clip = write_pattern_video(tmp_path / "clip.mp4", 1.0, 64, 48, 8, gop=8)
    assert indexer(["add", str(clip), "--data-dir", str(data)]) == 0  # no --model: the default one
    assert indexer(["stats", "--json", "--data-dir", str(data)]) == 0
    active = json.loads(capsys.readouterr().out.splitlines()[-1])["active_model"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # The service refuses to start with a model other than the catalog's active one, so starting is the check.
    with TestClient(create_app(Settings(data_dir=data, worker=False))) as client:
        assert client.get("/health").json()["model"]["id"] == active


def test_the_service_reads_the_same_dotenv_file_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "POSTGRES_PASSWORD=x\nTVS_MODEL=tiny\nTVS_TOP_K=5\nTVS_LOG_FORMAT=json\nTVS_DEVICE=\n"
    )
    monkeypatch.setenv("TVS_ENV_FILE", str(env_file))
    for name in ("TVS_MODEL", "TVS_TOP_K", "TVS_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TVS_LOG_FORMAT", "text")
    s = Settings()
    assert (s.model, s.top_k, s.log_format, s.device) == ("tiny", 5, "text", None)
    monkeypatch.setenv("TVS_ENV_FILE", "")
    assert Settings().top_k is None
