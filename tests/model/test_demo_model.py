"""The committed demo model: loads, stays small, carries its evaluation, and ranks unseen generated clips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "assets" / "demo-model"
MAX_BYTES = 20 * 1024 * 1024

pytestmark = pytest.mark.skipif(not DEMO.is_dir(), reason="no trained demo model at assets/demo-model")


def test_demo_model_is_a_small_checkpoint_under_20_mb():
    from model.checkpoint import load_model

    total = sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file())
    assert total <= MAX_BYTES, f"assets/demo-model is {total / 1e6:.1f} MB"
    model = load_model(str(DEMO))
    assert model.config.preset == "small" and model.config.focus_head == "candidate"
    assert model.model_id.startswith("small-")


def test_demo_model_ships_a_cut_off_calibrated_on_its_own_weights():
    from model.calibration import read_calibration
    from model.checkpoint import load_model

    calibration = read_calibration(DEMO)
    assert calibration is not None, "python -m model.calibrate assets/demo-model (TRAINING.md)"
    assert calibration.model_id == load_model(str(DEMO)).model_id
    assert calibration.queries == json.loads((DEMO / "metrics.json").read_text())["n_queries"]
    two_stage = calibration.cutoffs["two_stage"]
    assert two_stage.min_score is not None and two_stage.precision is not None
    assert two_stage.precision >= calibration.precision_target == 0.75
    assert "model.calibrate" in (DEMO / "TRAINING.md").read_text()


def test_demo_model_ships_its_evaluation_and_the_command_that_made_it():
    metrics = json.loads((DEMO / "metrics.json").read_text())
    for direction in ("t2v", "v2t"):
        for stage in ("broad", "two_stage"):
            assert set(metrics[direction][stage]) >= {"R@1", "R@5", "R@10", "MdR", "MnR"}
        # The focused view only reorders the top 10.
        assert metrics[direction]["two_stage"]["R@10"] == metrics[direction]["broad"]["R@10"]
    assert metrics["n_queries"] >= 400
    # The released model's focused view earns its place in both directions (at least 15 points of held-out
    # R@1 over broad), reading its candidates rather than expressing a prior over broad ranks.
    for direction in ("t2v", "v2t"):
        assert metrics[direction]["two_stage"]["R@1"] >= metrics[direction]["broad"]["R@1"] + 15
        spread = metrics[direction]["delta_by_slot"]
        assert spread["verdict"] == "content", spread
        assert spread["within"] > spread["between"], spread
    assert metrics["t2v"]["two_stage"]["R@1"] >= 67
    recipe = (DEMO / "TRAINING.md").read_text()
    assert "python -m model.train" in recipe and "python -m synth" in recipe


@pytest.mark.slow
def test_demo_model_ranks_unseen_generated_clips_far_above_chance(tmp_path):
    from model.checkpoint import load_model
    from model.evaluate import evaluate
    from model.manifest import read_manifest
    from synth.generator import generate_library

    # Seed 7 draws clips the model never trained on (it was trained on seed 0).
    summary = generate_library(tmp_path / "lib", families=5, seed=7, holdout=0.0, workers=1)
    samples = read_manifest(summary.manifest)
    metrics = evaluate(
        load_model(str(DEMO)), samples, cache_dir=tmp_path / "cache", workers=1, progress=False
    )
    chance_r1 = 100.0 / len(samples)  # 30 clips
    broad = metrics["t2v"]["broad"]
    assert broad["R@1"] >= 5 * chance_r1, broad
    assert broad["R@10"] >= 80.0, broad
    # Re-ranking the top 10 together fixes what a temporal mean cannot see (motion, order) on new clips too,
    # from what it reads in the candidates: its corrections are no function of the broad-view slot.
    assert metrics["t2v"]["two_stage"]["R@1"] >= broad["R@1"] + 5, metrics["t2v"]
    for direction in ("t2v", "v2t"):
        assert metrics[direction]["delta_by_slot"]["verdict"] == "content", metrics[direction]
