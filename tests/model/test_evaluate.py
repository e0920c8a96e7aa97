"""Evaluation: both stages and directions on generated clips, the sanity checks, the CLI's JSON."""

import json

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import build_model, load_model, save_checkpoint
from model.config import preset_config
from model.evaluate import evaluate, main, retrieval_metrics
from model.manifest import read_manifest
from model.outputs import TextOutput, VideoOutput
from synth.generator import generate_library
from synth.media import write_hostile_files

KEYS = {"R@1", "R@5", "R@10", "MdR", "MnR"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Two families (12 clips of 1 s at 32 px), one extra caption for a clip, one broken file."""
    out = tmp_path_factory.mktemp("lib")
    summary = generate_library(out, families=2, seed=0, holdout=0.5, size=32, fps=12, seconds=1.0, workers=1)
    lines = summary.manifest.read_text().splitlines()
    first = json.loads(lines[0])
    broken = write_hostile_files(out / "hostile")["truncated"]
    lines += [
        json.dumps({**first, "caption": "another caption of the first clip"}),
        json.dumps({"video": str(broken), "caption": "a clip that cannot be decoded", "kind": "broken"}),
    ]
    (out / "eval.jsonl").write_text("\n".join(lines) + "\n")
    return read_manifest(out / "eval.jsonl"), out


def _randomise_focus(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for view in (model.focus_t2v, model.focus_v2t):
            view.head[-1].weight.normal_(std=5.0)
    return model


def test_untrained_focused_view_leaves_every_metric_unchanged(library, tmp_path):
    samples, _ = library
    metrics = evaluate(load_model("tiny"), samples, cache_dir=tmp_path, workers=1, progress=False)
    assert metrics["n_queries"] == 13 and metrics["n_videos"] == 12 and metrics["skipped_videos"] == 1
    assert metrics["top_k"] == 4
    for direction in ("t2v", "v2t"):
        assert set(metrics[direction]["broad"]) == KEYS
        assert metrics[direction]["two_stage"] == metrics[direction]["broad"]


def test_two_stage_only_reorders_the_top_k(library, tmp_path):
    samples, _ = library
    model = _randomise_focus(build_model(preset_config("tiny", top_k=10)))
    metrics = evaluate(model, samples, cache_dir=tmp_path, workers=1, group_key="kind", progress=False)
    assert metrics["top_k"] == 10
    for direction in ("t2v", "v2t"):
        broad, two = metrics[direction]["broad"], metrics[direction]["two_stage"]
        assert two["R@10"] == broad["R@10"]
        assert two != broad, "a random focused view must move some ranks, or this test proves nothing"
    groups = metrics["by_group"]
    assert groups["key"] == "kind"
    assert set(groups["broad"]) == {"base", "colour", "shape", "motion", "order", "background"}
    assert set(groups["two_stage"]) == set(groups["broad"])


def test_metrics_follow_the_scores():
    model = load_model("tiny")
    cls = F.normalize(torch.randn(5, 32), dim=-1)
    tokens = cls[:, None].expand(5, 4, 32).clone()
    clip_index = torch.tensor([0, 1, 2, 3, 4, 4]).numpy()  # video 4 has two captions
    text = TextOutput(i1=cls[clip_index], indicators=F.normalize(torch.randn(6, 3, 32), dim=-1))
    perfect = retrieval_metrics(model, text, VideoOutput(tokens, cls), clip_index)
    assert perfect["t2v"]["broad"]["R@1"] == 100.0 and perfect["v2t"]["broad"]["MnR"] == 1.0
    wrong = retrieval_metrics(
        model, TextOutput(-text.i1, text.indicators), VideoOutput(tokens, cls), clip_index
    )
    assert wrong["t2v"]["broad"]["R@1"] == 0.0
    assert wrong["t2v"]["broad"]["MnR"] == pytest.approx(5.0)  # the truth scores lowest of 5 every time


def test_cli_writes_design_json_and_prints_a_table(library, tmp_path, capsys):
    _, folder = library
    save_checkpoint(load_model("tiny"), tmp_path / "ckpt")
    out = tmp_path / "metrics.json"
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--manifest", str(folder / "manifest.jsonl")]
    assert main([*args, "--out", str(out), "--group-key", "kind", "--cache-dir", str(tmp_path / "c")]) == 0
    metrics = json.loads(out.read_text())
    assert {"t2v", "v2t", "n_queries", "n_videos", "model_id", "top_k", "by_group"} <= set(metrics)
    assert (
        set(metrics["t2v"]) == {"broad", "two_stage", "delta_by_slot"}
        and set(metrics["v2t"]["two_stage"]) == KEYS
    )
    assert metrics["model_id"] == load_model(str(tmp_path / "ckpt")).model_id
    printed = capsys.readouterr().out
    assert "| t2v | two_stage |" in printed and "| motion |" in printed
