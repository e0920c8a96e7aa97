"""Training loop: parameter groups, schedule, checkpoints each epoch, exact resume, the CLI."""

import json

import numpy as np
import pytest
import torch

from model.calibration import read_calibration
from model.checkpoint import load_model
from model.data import FrameCache, prepare_clips
from model.manifest import read_manifest
from model.train import main
from model.training import ResumeError, TrainConfig, cosine_with_warmup, param_groups, train

pytestmark = pytest.mark.usefixtures("one_thread")


COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]


def _decoder(path, num_frames, size, start=None, end=None):
    """A flat colour per clip with a moving bright bar: learnable, and cheap (no video files needed)."""
    i = int(path.rsplit("v", 1)[1].split(".")[0])
    rng = np.random.default_rng(i)
    frames = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (num_frames, size, size, 3)).copy()
    for t in range(num_frames):
        frames[t, :, (i + t) % size] = 255
    return frames


@pytest.fixture
def clips(tmp_path):
    rows = []
    for i, colour in enumerate(COLOURS):
        (tmp_path / f"v{i}.mp4").write_bytes(b"\0")
        rows += [{"video": f"v{i}.mp4", "caption": f"a {colour} clip number {i}", "family": i // 4}]
        rows += [{"video": f"v{i}.mp4", "caption": f"{colour} screen {i}", "family": i // 4}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = FrameCache(tmp_path / "cache", num_frames=4, size=32, decoder=_decoder)
    return prepare_clips(read_manifest(tmp_path / "m.jsonl"), cache, progress=False)


def _cfg(**kw):
    base = dict(epochs=2, batch_size=8, lr_focus=1e-3, lr_backbone=1e-3, warmup_steps=2, progress=False)
    return TrainConfig(**{**base, **kw})


def test_param_groups_split_focus_backbone_and_decay():
    model = load_model("tiny")
    groups = param_groups(model, lr_focus=1e-4, lr_backbone=1e-6, weight_decay=0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values()), "every parameter exactly once"
    where = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert where["indicators"] == (1e-4, 0.0)
    assert where["focus_t2v.blocks.0.q_proj.weight"] == (1e-4, 0.2)
    assert where["focus_t2v.blocks.0.q_proj.bias"] == (1e-4, 0.0)
    assert where["focus_v2t.key_pos"] == (1e-4, 0.0)
    assert where["clip.transformer.resblocks.0.mlp.c_fc.weight"] == (1e-6, 0.2)
    assert where["clip.token_embedding.weight"] == (1e-6, 0.0)
    assert where["clip.positional_embedding"] == (1e-6, 0.0)
    assert where["clip.ln_final.weight"] == (1e-6, 0.0)
    assert where["clip.logit_scale"] == (1e-6, 0.0)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup=4, total=14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_training_saves_each_epoch_and_resume_continues_exactly(tmp_path, clips):
    straight = load_model("tiny")
    summary = train(straight, clips, tmp_path / "a", _cfg())
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert summary["steps"] == 2 * 2 and all(np.isfinite(h["loss"]) for h in summary["history"])
    on_disk = json.loads((tmp_path / "a" / "train_summary.json").read_text())
    assert on_disk["history"] == summary["history"]

    paused = load_model("tiny")
    train(paused, clips, tmp_path / "b", _cfg(stop_after=1))
    first = load_model(str(tmp_path / "b" / "model"))
    assert not torch.equal(first.indicators, load_model("tiny").indicators), "the epoch-1 checkpoint trained"
    resumed = load_model("tiny")
    summary_b = train(resumed, clips, tmp_path / "b", _cfg(), resume=True)
    assert [h["loss"] for h in summary_b["history"]] == [h["loss"] for h in summary["history"]]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert (
        load_model(str(tmp_path / "b" / "model")).model_id
        == load_model(str(tmp_path / "a" / "model")).model_id
    )


def test_existing_runs_are_not_overwritten_and_resume_checks_settings(tmp_path, clips):
    train(load_model("tiny"), clips, tmp_path, _cfg(epochs=1))
    with pytest.raises(ResumeError, match="--resume"):
        train(load_model("tiny"), clips, tmp_path, _cfg(epochs=1))
    with pytest.raises(ResumeError, match="batch_size"):
        train(load_model("tiny"), clips, tmp_path, _cfg(epochs=2, batch_size=4), resume=True)
    with pytest.raises(ResumeError, match="not found"):
        train(load_model("tiny"), clips, tmp_path / "new", _cfg(), resume=True)


def test_batch_larger_than_the_library_is_refused(tmp_path, clips):
    with pytest.raises(ValueError, match="batch-size"):
        train(load_model("tiny"), clips, tmp_path, _cfg(batch_size=64))


def test_cli_trains_on_generated_clips_and_exports_fp16(tmp_path, capsys):
    from synth.generator import generate_library

    lib = generate_library(
        tmp_path / "lib", families=2, seed=0, holdout=0.5, size=32, fps=12, seconds=1.0, workers=1
    )
    out, export = tmp_path / "run", tmp_path / "release"
    args = [
        "--manifest",
        str(lib.train),
        "--val-manifest",
        str(lib.test),
        "--preset",
        "tiny",
        "--out",
        str(out),
    ]
    args += ["--epochs", "1", "--batch-size", "6", "--lr-backbone", "1e-3", "--group-key", "family"]
    args += ["--ground-weight", "1"]
    args += [
        "--val-group-key",
        "kind",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
        "--threads",
        "1",
    ]
    assert main([*args, "--export", str(export), "--export-dtype", "fp16"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["train_videos"] == 6 and summary["steps"] == 1
    (record,) = summary["history"]
    assert set(record["val_t2v_R@1"]) == {"broad", "two_stage"}
    assert np.isfinite(record["ground"]) and record["ground"] > 0
    assert set(record["val_t2v_R@1_by_group"]["broad"]) == {
        "base",
        "colour",
        "shape",
        "motion",
        "order",
        "background",
    }
    trained, released = load_model(str(out / "model")), load_model(str(export))
    size = (export / "model.safetensors").stat().st_size
    assert size < 0.6 * (out / "model" / "model.safetensors").stat().st_size
    assert released.indicators.dtype == torch.float32
    assert torch.allclose(released.indicators, trained.indicators, atol=1e-3)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model_id"] == trained.model_id
    # Each saved model carries its own cut-off, measured on its own weights over the validation set.
    for folder, saved in ((out / "model", trained), (export, released)):
        calibration = read_calibration(folder)
        assert calibration is not None and calibration.model_id == saved.model_id
        assert calibration.precision_target == 0.9 and calibration.queries == 6
        assert calibration.validation_set == str(lib.test)


def test_cli_needs_a_model_and_explains_options(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--preset"):
        main(["--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--lr-backbone" in capsys.readouterr().out


def _fine_tune_vit_b32(tmp_path):
    """--init ViT-B-32:/local/weights (random weights standing in for openai's): two steps, the new view."""
    import open_clip

    from synth.generator import generate_library

    weights = tmp_path / "vit-b-32.pt"
    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), weights)
    lib = generate_library(tmp_path / "lib", 1, seed=0, holdout=0.0, size=32, seconds=1.0, workers=1)
    out = tmp_path / "run"
    args = ["--manifest", str(lib.train), "--init", f"ViT-B-32:{weights}", "--out", str(out)]
    args += ["--epochs", "1", "--batch-size", "3", "--lr-backbone", "1e-6", "--lr-focus", "1e-2"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--no-progress", "--decode-workers", "1"]
    assert main(args) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["preset"] == "ViT-B-32"
    assert all(np.isfinite(r["focus_t2v"]) and np.isfinite(r["loss"]) for r in summary["history"])
    tuned = load_model(str(out / "model"))
    assert tuned.config.focus_head == "candidate" and tuned.config.pretrained == str(weights)
    # The zero-initialised last layer has moved: the focused view trained.
    assert tuned.focus_t2v.head[-1].weight.abs().sum() > 0
    assert tuned.focus_v2t.head[-1].weight.abs().sum() > 0
    return args, out, summary


@pytest.mark.slow
def test_fine_tuning_a_pretrained_vit_b32_trains_the_candidate_view(tmp_path, one_thread):
    args, out, _ = _fine_tune_vit_b32(tmp_path)
    with pytest.raises(SystemExit, match="checkpoint keeps"):
        main([*args[:2], "--init", str(out / "model"), "--focus-head", "slot", "--out", str(tmp_path / "b")])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fine_tuning_a_pretrained_vit_b32_on_cuda_with_mixed_precision(tmp_path):
    """On a GPU the same fine-tuning runs on CUDA under autocast (bf16, or fp16 with a gradient scaler)."""
    _, _, summary = _fine_tune_vit_b32(tmp_path)
    assert summary["device"].startswith("cuda")


def test_focus_head_option_builds_the_slot_head_for_comparison(tmp_path):
    from model.train import _initial_model

    assert _initial_model("tiny", None, "slot").focus_t2v.slot_emb is not None
    assert _initial_model("tiny", None).focus_t2v.slot_emb is None
