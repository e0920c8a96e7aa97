"""Checkpoint round trip and the errors a user sees for bad model specs."""

import json

import pytest
import torch

from model.checkpoint import CheckpointError, load_model, save_checkpoint
from model.config import UnknownPresetError


def test_round_trip_gives_identical_outputs(tmp_path):
    model = load_model("tiny")
    with torch.no_grad():
        model.focus_t2v.head[-1].weight.normal_()
        model.indicators.normal_()
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_model(str(tmp_path / "ckpt"))
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["preset"] == "tiny"
    ids = model.tokenize(["a blue circle moves up"])
    frames = torch.randn(1, 4, 3, 32, 32)
    q = torch.randn(1, 3, 32)
    with torch.no_grad():
        for m_out, l_out in [
            (model.encode_text(ids).indicators, loaded.encode_text(ids).indicators),
            (model.encode_frames(frames).frame_tokens, loaded.encode_frames(frames).frame_tokens),
            (model.rescore_videos(q, torch.randn(1, 4, 4, 32)).delta, None),
        ]:
            if l_out is not None:
                assert torch.equal(m_out, l_out)
    cands = torch.randn(1, 4, 4, 32)
    with torch.no_grad():
        assert torch.equal(model.rescore_videos(q, cands).delta, loaded.rescore_videos(q, cands).delta)
    assert loaded.model_id.startswith("tiny-")
    assert load_model(str(tmp_path / "ckpt")).model_id == loaded.model_id


def test_random_presets_are_deterministic():
    a, b = load_model("tiny"), load_model("tiny")
    assert a.model_id == b.model_id
    assert torch.equal(a.indicators, b.indicators)


def test_unknown_preset_names_the_choices():
    with pytest.raises(UnknownPresetError, match="tiny"):
        load_model("ViT-Z-99")


def test_missing_directory_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory"):
        load_model(str(tmp_path / "nope" / "ckpt"))


def test_corrupt_checkpoints_are_refused(tmp_path):
    save_checkpoint(load_model("tiny"), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(str(tmp_path))


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    save_checkpoint(load_model("tiny"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_indicators"] = 6
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="match"):
        load_model(str(tmp_path))


def test_pretrained_tag_on_a_project_preset_is_refused():
    with pytest.raises(UnknownPresetError, match="pretrained"):
        load_model("small:openai")


def test_a_version_1_config_is_the_slot_head_it_was_saved_with():
    import dataclasses

    from model.config import TokenBinderConfig, preset_config

    saved = dataclasses.asdict(preset_config("tiny"))
    del saved["focus_head"]
    saved["version"] = 1
    old = TokenBinderConfig.from_dict(json.loads(json.dumps(saved)))
    assert old.focus_head == "slot"
    assert TokenBinderConfig.from_dict(dataclasses.asdict(preset_config("tiny"))).focus_head == "candidate"
    with pytest.raises(ValueError, match="focus_head"):
        preset_config("tiny", focus_head="rank")
