"""The `indexer` command line, called in-process: every command's help, a whole library's life, errors."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import pytest
from PIL import Image

from indexer.cli import build_parser, main
from indexer.db import make_engine, make_session_factory
from indexer.live_index import open_for_model
from indexer.paths import DataDir
from model.checkpoint import load_model, save_checkpoint
from synth.generator import write_pattern_video
from synth.media import write_format_samples, write_tone


def torch_cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


COMMANDS = [
    "migrate",
    "add",
    "worker",
    "watch",
    "reindex",
    "rebuild-index",
    "verify",
    "compact",
    "stats",
    "rm",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: indexer {command}" in out and "--data-dir" in out and "--json" in out


def test_the_parser_lists_every_command() -> None:
    assert set(COMMANDS) <= set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.delenv("TVS_MODEL", raising=False)
    monkeypatch.delenv("TVS_DATABASE_URL", raising=False)
    base = ["--data-dir", str(tmp_path / "data"), "--model", "tiny"]

    def run(*args: str, model: str | None = None) -> tuple[int, str, str]:
        argv = [*args[:1], *base, *args[1:]]
        if model:
            argv[argv.index("tiny")] = model
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _library(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_pattern_video(folder / f"clip{i}.mp4", 1.0 + 0.25 * i, 64, 48, 8, gop=8)
    return folder


def test_a_library_from_add_to_rm(cli, tmp_path: Path) -> None:
    lib = _library(tmp_path / "lib", 3)
    # A fresh data directory: the catalog's schema is created on the way, no `indexer migrate` first.
    code, out, _ = cli("add", str(lib), "--json")
    report = json.loads(out)
    assert code == 0 and (report["files"], report["indexed"], report["segments"], report["failed"]) == (
        3,
        3,
        3,
        {},
    )
    code, out, _ = cli("add", str(lib / "clip0.mp4"))
    assert code == 0 and "0 indexed, 1 already indexed" in out

    code, out, _ = cli("stats", "--json")
    stats = json.loads(out)
    assert (
        stats["videos"]["ready"] == 3 and stats["segments"] == 3 and stats["active_model"].startswith("tiny")
    )
    code, out, _ = cli("verify")
    assert code == 0 and "OK" in out

    assert cli("rm", "1")[0] == 0
    assert cli("rm", "1", "99")[0] == 1, "an unknown video id is an error"
    code, out, _ = cli("verify", "--json")
    assert code == 1 and json.loads(out)["index_extra"], "the saved snapshot still holds the deleted video"
    code, out, _ = cli("rebuild-index", "--json")
    assert code == 0 and json.loads(out)["count"] == 2
    assert cli("verify")[0] == 0

    code, _, err = cli("add", str(tmp_path / "nowhere"))
    assert code == 2 and "no such file" in err


def test_add_indexes_every_container_ffmpeg_reads_and_lists_what_it_skipped(cli, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    videos = write_format_samples(lib / "camera")
    Image.new("RGB", (32, 24), (200, 120, 40)).save(lib / "photo.jpg", format="JPEG")
    (lib / "notes.txt").write_text("shot list: beach, harbour\n")
    (lib / "camera" / "0001.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nhello\n")
    (lib / ".partial.mp4").write_bytes(b"hidden files are not looked at")
    whole = write_pattern_video(tmp_path / "whole.mp4", 2.0, 64, 48, 8, gop=8)
    (lib / "cut.dat").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    write_tone(lib / "memo.rec")
    skipped = {
        "photo.jpg": "not a video (image/jpeg)",
        "notes.txt": "not a video (text/plain)",
        "0001.srt": "sidecar file (.srt)",
        "cut.dat": "cannot decode: it is truncated or corrupt",
        "memo.rec": "no video stream",
    }

    code, out, _ = cli("add", str(lib), "--json")
    report = json.loads(out)
    assert (code, report["files"], report["failed"]) == (0, len(videos) + len(skipped), {}), report
    assert (report["indexed"], report["segments"]) == (len(videos), len(videos))
    assert {Path(p).name: why for p, why in report["skipped"].items()} == skipped
    assert sum(report["skipped_by_reason"].values()) == len(skipped)
    code, out, _ = cli("stats", "--json")
    assert json.loads(out)["videos"]["ready"] == len(videos) and json.loads(out)["videos"]["failed"] == 0

    code, out, _ = cli("add", str(lib))
    assert code == 0 and f"{len(videos)} already indexed, 0 failed, {len(skipped)} skipped" in out
    assert "1 not a video (image/jpeg)" in out and "1 no video stream" in out and str(lib) not in out
    code, out, _ = cli("add", str(lib), "--verbose")
    for name, why in skipped.items():
        assert f"{next(lib.rglob(name))}: {why}" in out


def test_verify_repair_reencodes_and_reindex_switches_models(cli, tmp_path: Path) -> None:
    lib = _library(tmp_path / "lib", 2)
    assert cli("add", str(lib))[0] == 0
    shard = next((tmp_path / "data" / "tokens").glob("*/shard-*.tok"))
    raw = bytearray(shard.read_bytes())
    first_record = next(i for i in range(4096, len(raw)) if raw[i])  # shards are sparse until written
    raw[first_record + 40] ^= 0xFF  # inside its payload: fails its checksum
    shard.write_bytes(bytes(raw))
    assert cli("verify")[0] == 1
    code, out, _ = cli("verify", "--repair", "--json")
    assert code == 0 and json.loads(out)["ok"]

    other = save_checkpoint(load_model("tiny"), tmp_path / "ckpt")
    code, out, _ = cli("reindex", "--json", model=str(other))
    report = json.loads(out)
    assert code == 0 and report["switched"] and report["indexed"] == 2
    code, _, err = cli("add", str(lib))
    assert code == 2 and "indexer reindex --model" in err, "the old model is refused after the switch"
    assert cli("verify", model=str(other))[0] == 0


def test_compact_prunes_what_the_snapshots_cover(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lib = _library(tmp_path / "lib", 3)
    code, out, _ = cli("add", str(lib), "--json")
    assert code == 0 and json.loads(out)["indexed"] == 3
    model_id = json.loads(cli("stats", "--json")[1])["active_model"]
    code, out, _ = cli("compact")
    assert code == 0 and out.splitlines() == [
        f"{model_id}: pruned 0 change row(s) through seq 0, 3 kept",
        "pruned 0 change row(s) older than 600 s that the snapshots cover",
    ], "younger than the default retention: kept"

    assert cli("rm", "1")[0] == 0  # a delete the snapshot `add` saved does not cover
    code, out, _ = cli("compact", "--retention-s", "0", "--json")
    report = json.loads(out)
    assert code == 0 and (report["retention_s"], report["pruned"]) == (0, 3)
    assert report["models"] == [
        {"model_id": model_id, "snapshot_seq": 3, "pruned": 3, "horizon": 3, "kept": 1}
    ]

    monkeypatch.setenv("TVS_FEED_RETENTION_S", "0")
    assert cli("rebuild-index")[0] == 0  # its snapshot covers the delete, and saving it prunes
    code, out, _ = cli("compact", "--json")
    assert json.loads(out)["models"][0] == {
        "model_id": model_id, "snapshot_seq": 4, "pruned": 0, "horizon": 4, "kept": 0
    }  # fmt: skip
    assert cli("verify")[0] == 0

    with pytest.raises(SystemExit) as exit_info:
        cli("compact", "--retention-s", "-1")
    assert exit_info.value.code == 2 and "seconds >= 0" in capsys.readouterr().err


@pytest.mark.postgres
def test_a_postgresql_catalog_through_database_url(postgres_url: str, cli, tmp_path: Path) -> None:
    lib = _library(tmp_path / "lib", 2)
    db = ["--database-url", postgres_url]
    assert cli("migrate", *db)[0] == 0
    code, out, _ = cli("add", *db, "--json", str(lib))
    assert code == 0 and json.loads(out)["indexed"] == 2
    assert cli("verify", *db)[0] == 0
    assert not (tmp_path / "data" / "catalog.db").exists(), "nothing went to the default SQLite catalog"


def _synthetic_cli(synthetic_library, capsys: pytest.CaptureFixture[str]):
    root, url, _ = synthetic_library

    def run(*args: str) -> tuple[int, str, str]:
        code = main([args[0], "--data-dir", str(root), "--database-url", url, *args[1:]])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_rebuild_index_takes_the_index_knobs_and_saves_them_for_the_service(
    synthetic_library, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TVS_MODEL", raising=False)
    cli = _synthetic_cli(synthetic_library, capsys)
    code, out, err = cli(
        "rebuild-index",
        "--index-factory",
        "IVF16,Flat",
        "--index-nprobe",
        "4",
        "--index-rerank",
        "25",
        "--json",
    )
    manifest = json.loads(out)
    assert code == 0, err
    assert (manifest["factory"], manifest["nprobe"], manifest["rerank"], manifest["count"]) == (
        "IVF16,Flat",
        4,
        25,
        5000,
    )
    # The environment names the same knobs; the text output says what is in force.
    monkeypatch.setenv("TVS_INDEX_NPROBE", "6")
    code, out, _ = cli("rebuild-index", "--factory", "IVF16,Flat")
    assert code == 0 and "(IVF16,Flat; nprobe 6, rerank 25)" in out
    root, url, _ = synthetic_library
    engine = make_engine(url)
    try:  # what a service with no knobs of its own loads
        live = open_for_model(DataDir(root), make_session_factory(engine), "synthetic-32", "IVF16,Flat")
        with live.open(follow=False):
            assert live.search_settings() == {"nprobe": 6, "ef_search": None, "rerank": 25}
    finally:
        engine.dispose()


def test_the_index_knobs_and_retention_come_from_the_dotenv_file_like_the_services(
    synthetic_library, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TVS_MODEL", raising=False)
    cli = _synthetic_cli(synthetic_library, capsys)
    env_file = tmp_path / "tvs.env"
    env_file.write_text("TVS_INDEX_NPROBE=3\nTVS_INDEX_RERANK=7\nTVS_FEED_RETENTION_S=0\n")
    monkeypatch.setenv("TVS_ENV_FILE", str(env_file))
    code, out, err = cli("rebuild-index", "--factory", "IVF16,Flat", "--index-rerank", "9")
    assert code == 0 and "(IVF16,Flat; nprobe 3, rerank 9)" in out, err  # the flag wins over the file
    code, out, _ = cli("compact", "--json")
    assert code == 0 and json.loads(out)["retention_s"] == 0
    env_file.write_text("TVS_INDEX_RERANK=-1\n")
    code, out, err = cli("rebuild-index")
    assert (
        (code, out) == (2, "") and "TVS_INDEX_RERANK='-1'" in err and "greater than or equal to 0" in err
    ), err


def test_rebuild_index_refuses_knobs_that_do_not_fit(
    synthetic_library, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TVS_MODEL", raising=False)
    cli = _synthetic_cli(synthetic_library, capsys)
    code, _, err = cli("rebuild-index", "--index-factory", "Flat", "--index-nprobe", "4")
    assert code == 2 and "nprobe=4 needs an IVF factory" in err
    code, _, err = cli("rebuild-index", "--index-factory", "HNSW16", "--index-ef-search", "0")
    assert code == 2 and "--index-ef-search=0: Input should be greater than or equal to 1" in err
    with pytest.raises(SystemExit) as exit_info:
        cli("rebuild-index", "--index-device", "gpu")
    assert exit_info.value.code == 2 and "not one of auto, cpu, cuda, cuda:N" in capsys.readouterr().err


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources"), reason="faiss has GPU support here")
@pytest.mark.parametrize("command", ["rebuild-index", "verify"])
def test_a_gpu_index_device_without_faiss_gpu_support_exits_2(
    synthetic_library, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.delenv("TVS_MODEL", raising=False)
    cli = _synthetic_cli(synthetic_library, capsys)
    code, out, err = cli(command, "--index-device", "cuda")
    assert code == 2 and out == ""
    assert f"indexer {command}: index device 'cuda' cannot be used: faiss has no GPU support" in err
    monkeypatch.setenv("TVS_INDEX_DEVICE", "cuda:0")
    assert cli(command)[0] == 2
    monkeypatch.setenv("TVS_INDEX_DEVICE", "auto")
    code, out, _ = cli("rebuild-index", "--json")
    assert code == 0 and json.loads(out)["count"] == 5000  # auto: on the CPU here


# --- settings shared with the service (indexer.settings) and logging (indexer.log_setup) ------------------------
def test_the_cli_refuses_a_bad_device_or_precision_before_any_work(
    cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TVS_DEVICE", "gpu")
    code, out, err = cli("stats")
    assert (code, out) == (2, "") and "TVS_DEVICE='gpu': 'gpu' is not one of cpu, cuda, cuda:N" in err, err
    monkeypatch.setenv("TVS_DEVICE", "cpu")
    monkeypatch.setenv("TVS_PRECISION", "fp8")
    code, _, err = cli("stats")
    assert code == 2 and "TVS_PRECISION='fp8'" in err and "'bf16'" in err, err


@pytest.mark.skipif(torch_cuda_available(), reason="this machine has a CUDA device")
def test_a_cuda_device_on_a_machine_without_one_is_a_clear_error(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TVS_DEVICE", "cuda")
    code, out, err = cli("add", str(_library(tmp_path / "lib", 1)))
    assert (code, out) == (2, "") and "TVS_DEVICE=cuda but torch sees no CUDA device" in err, err


def test_the_cli_applies_precision_and_threads_and_logs_json(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    lib = _library(tmp_path / "lib", 1)
    for name, value in [
        ("TVS_PRECISION", "bf16"),
        ("TVS_TORCH_THREADS", "1"),
        ("TVS_LOG_FORMAT", "json"),
        ("TVS_LOG_LEVEL", "info"),
    ]:
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    try:
        code, _, err = cli("add", str(lib))
        applied = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and applied == 1
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert lines and len(lines) == len([line for line in err.splitlines() if line.strip()]), err
    assert any(line["logger"] == "model.inference" and "bfloat16" in line["message"] for line in lines), err
    outcome = [line for line in lines if line["logger"] == "indexer.worker" and "job_id" in line]
    assert (
        len(outcome) == 1 and outcome[0]["state"] == "ready" and outcome[0]["video"] == str(lib / "clip0.mp4")
    )
    assert outcome[0]["seconds"] > 0 and outcome[0]["error"] is None and outcome[0]["request_id"] == "-"


def test_the_cli_reads_a_dotenv_file_and_flags_win_over_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env_file = tmp_path / "tvs.env"
    env_file.write_text(f"POSTGRES_PASSWORD=ignored\nTVS_DATA_DIR={tmp_path / 'from-env-file'}\n")
    monkeypatch.setenv("TVS_ENV_FILE", str(env_file))
    monkeypatch.delenv("TVS_DATA_DIR", raising=False)
    assert main(["stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data_dir"] == str(tmp_path / "from-env-file")
    assert main(["stats", "--json", "--data-dir", str(tmp_path / "flag")]) == 0
    assert json.loads(capsys.readouterr().out)["data_dir"] == str(tmp_path / "flag")
