"""`indexer reindex --engine ray` on a local Ray instance gives the local engine's segments, vectors and thumbnails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from indexer.catalog import Segment, Video
from indexer.cli import main
from indexer.db import make_engine, make_session_factory, session_scope
from indexer.paths import DataDir
from indexer.pipeline import Encoder, PipelineConfig
from indexer.ray_engine import EncodeActor, _remote_error, decode_video
from indexer.token_store import TokenStore
from model.checkpoint import load_model, save_checkpoint
from model.inference import prepare_for_inference
from model.video import VideoDecodeError
from synth.generator import write_pattern_video

# Windows shorter than the clips, so that a video gives several segments (and batches span videos).
WINDOWS = ["--max-segment-s", "1.5", "--window-s", "0.75"]
DURATIONS = [1.0, 1.25, 2.5, 3.0, 1.5]
FP16_STEP = 2.0**-11  # one fp16 step for values in [0.5, 1): the store keeps tokens and CLS in fp16


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance (2 CPUs) for the module: starting Ray costs seconds."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install '.[distributed]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install '.[distributed]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.delenv("TVS_MODEL", raising=False)
    monkeypatch.delenv("TVS_DATABASE_URL", raising=False)

    def call(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return call


def _generation(root: Path, model_id: str) -> dict[tuple[str, int, float, float], tuple]:
    """(video sha256, ordinal, start, end) -> (tokens, cls, thumbnail bytes) of one model's segments."""
    data = DataDir(root)
    engine = make_engine(data.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            rows = session.execute(
                select(Segment.id, Video.sha256, Segment.ordinal, Segment.start_s, Segment.end_s, Segment.thumbnail)
                .join(Video, Video.id == Segment.video_id)
                .where(Segment.model_id == model_id)
                .order_by(Segment.id)
            ).all()  # fmt: skip
    finally:
        engine.dispose()
    model = load_model("tiny").config
    with TokenStore(data.tokens_dir(model_id), model.num_frames, model.embed_dim, readonly=True) as store:
        tokens, cls = store.get([r[0] for r in rows])
    return {
        (sha, ordinal, round(start, 6), round(end, 6)): (
            tokens[n].astype(np.float32),
            cls[n].astype(np.float32),
            (root / thumb).read_bytes(),
        )
        for n, (_, sha, ordinal, start, end, thumb) in enumerate(rows)
    }


@pytest.mark.slow
def test_ray_reindex_matches_the_local_engine(ray_local, run, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    for i, seconds in enumerate(DURATIONS):
        write_pattern_video(lib / f"clip{i}.mp4", seconds, 64, 48, 8, gop=8)
    base = tmp_path / "base"
    assert run("migrate", "--data-dir", str(base))[0] == 0
    assert run("add", "--data-dir", str(base), "--model", "tiny", str(lib))[0] == 0
    local, remote = tmp_path / "local", tmp_path / "ray"
    shutil.copytree(base, local)
    shutil.copytree(base, remote)
    new_model = save_checkpoint(load_model("tiny"), tmp_path / "ckpt")  # same weights, another model id
    new_id = load_model(str(new_model)).model_id

    def reindex(root: Path, *extra: str) -> tuple[int, dict]:
        code, out, err = run(
            "reindex", "--data-dir", str(root), "--model", str(new_model), "--json", *WINDOWS, *extra
        )
        return code, json.loads(out) if out.strip() else {"stderr": err}

    # A file broken since it was added fails alone, in both engines; the switch waits for it.
    broken = lib / "clip1.mp4"
    intact = broken.read_bytes()
    broken.write_bytes(intact[:100])
    code, by_local = reindex(local)
    assert code == 1 and not by_local["switched"] and by_local["indexed"] == len(DURATIONS) - 1, by_local
    code, by_ray = reindex(remote, "--engine", "ray")
    keys = ("files", "indexed", "segments", "failed", "switched")
    assert code == 1 and {k: by_ray[k] for k in keys} == {k: by_local[k] for k in keys}, by_ray
    assert list(by_ray["failed"]) == [f"video 2 ({broken})"]

    expected, got = _generation(local, new_id), _generation(remote, new_id)
    assert len(expected) == 1 + 4 + 4 + 1 and sorted(got) == sorted(expected), "same video/ordinal/start/end"
    for key, (tokens, cls, thumb) in expected.items():
        np.testing.assert_allclose(got[key][0], tokens, rtol=0, atol=FP16_STEP, err_msg=f"tokens of {key}")
        np.testing.assert_allclose(got[key][1], cls, rtol=0, atol=FP16_STEP, err_msg=f"CLS of {key}")
        assert got[key][2] == thumb, f"thumbnail of {key}"

    # Repaired, a re-run (--missing) indexes just that video, completes the generation and switches.
    broken.write_bytes(intact)
    code, resumed = reindex(remote, "--engine", "ray")
    assert code == 0 and (resumed["files"], resumed["indexed"], resumed["switched"]) == (1, 1, True), resumed
    assert run("verify", "--data-dir", str(remote))[0] == 0, "the new model is the active one, and agrees"

    # The command line as a user runs it: its own process, starting (and stopping) its own Ray.
    argv = ["reindex", "--data-dir", str(remote), "--model", str(new_model), "--json", *WINDOWS, "--all"]
    proc = subprocess.run(
        [sys.executable, "-m", "indexer", *argv, "--engine", "ray", "--address", "local"],
        capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "TVS_MODEL"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    everything = json.loads(proc.stdout)
    assert everything["indexed"] == len(DURATIONS) and not everything["switched"], everything
    after = _generation(remote, new_id)
    assert len(after) == 11 and after.keys() >= got.keys()
    assert run("verify", "--data-dir", str(remote))[0] == 0, "replaced segments freed, snapshot current"


def test_engine_options_need_the_ray_engine(run, tmp_path: Path) -> None:
    code, _, err = run("reindex", "--data-dir", str(tmp_path), "--model", "tiny", "--address", "auto")
    assert code == 2 and "--engine ray" in err


def test_a_missing_ray_is_reported_with_the_install_command(
    run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    code, _, err = run("reindex", "--data-dir", str(tmp_path), "--model", "tiny", "--engine", "ray")
    assert code == 2 and "pip install '.[distributed]'" in err


def test_decode_rows_end_with_the_count_and_a_bad_file_gives_one_error_row(ray_local, tmp_path: Path) -> None:

    path = write_pattern_video(tmp_path / "a.mp4", 2.5, 64, 48, 8, gop=8)
    config = PipelineConfig(max_segment_s=1.5, window_s=0.75)
    rows = list(decode_video({"video_id": 7, "path": str(path)}, num_frames=4, size=32, config=config))
    assert [r["kind"] for r in rows] == ["seg"] * 4 + ["end"] and rows[-1]["count"] == 4
    assert [r["ordinal"] for r in rows[:-1]] == [0, 1, 2, 3]
    assert rows[-1]["duration_s"] == pytest.approx(2.5, abs=0.2)
    assert all(len(r["frames"]) == 4 * 32 * 32 * 3 and r["video_id"] == 7 for r in rows[:-1])
    assert len({tuple(sorted(r)) for r in rows}) == 1, "every row has the same columns"

    gone = {"video_id": 8, "path": str(tmp_path / "gone.mp4")}
    rows = list(decode_video(gone, num_frames=4, size=32, config=config))
    assert len(rows) == 1 and rows[0]["kind"] == "error" and rows[0]["error_type"] == "VideoDecodeError"
    assert rows[0]["error_reason"] == "missing" and "gone.mp4" in rows[0]["error"]


def test_the_encoder_actor_encodes_segments_and_fails_only_their_rows(ray_local) -> None:
    model = load_model("tiny")
    cfg = model.config
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    ref = ray_local.put({"config": cfg.to_json(), "state": state, "model_id": model.model_id})
    actor = EncodeActor([ref], cfg.num_frames, cfg.image_size)
    frames = np.random.default_rng(0).integers(
        0, 255, (2, cfg.num_frames, cfg.image_size, cfg.image_size, 3), np.uint8
    )
    batch = {
        "video_id": np.array([1, 1, 2]), "kind": np.array(["seg", "seg", "end"]),
        "frames": np.array([frames[0].tobytes(), frames[1].tobytes(), b""], dtype=object),
        **{name: np.array(["", "", ""]) for name in ("error_type", "error", "error_path", "error_reason")},
    }  # fmt: skip
    out = actor(dict(batch))
    assert "frames" not in out and list(out["kind"]) == ["seg", "seg", "end"] and out["tokens"][2] == b""

    tokens, cls = Encoder(prepare_for_inference(model)).encode(frames)  # the precision the actor picks
    got = np.frombuffer(out["tokens"][1], np.float32).reshape(cfg.num_frames, cfg.embed_dim)
    np.testing.assert_allclose(got, tokens[1], atol=1e-6)
    np.testing.assert_allclose(np.frombuffer(out["cls"][0], np.float32), cls[0], atol=1e-6)

    def broken(_: np.ndarray) -> None:
        raise VideoDecodeError("x.mp4", VideoDecodeError.CORRUPT, "simulated")

    actor.encoder.encode = broken  # type: ignore[method-assign]
    out = actor(dict(batch))
    assert list(out["kind"]) == ["error", "error", "end"], "the end row passes through untouched"
    error = _remote_error({name: out[name][0] for name in out})
    assert isinstance(error, VideoDecodeError) and error.reason == "corrupt" and "simulated" in str(error)
