"""The default score cut-off: the threshold search on synthetic validation scores, and `python -m model.calibrate`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.calibrate import main
from model.calibration import (
    CALIBRATION_FILE,
    CalibrationError,
    cutoff_for_precision,
    read_calibration,
)
from model.checkpoint import load_model, save_checkpoint
from synth.generator import generate_library

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_cut_off_is_the_lowest_score_that_keeps_the_precision():
    scores = np.array([0.5, 0.9, 0.6, 0.8, 0.7])
    correct = np.array([False, True, True, True, False])
    # Best first: 0.9 T, 0.8 T, 0.7 F, 0.6 T, 0.5 F -> precision 1, 1, 2/3, 3/4, 3/5.
    cut = cutoff_for_precision(scores, correct, 0.75)
    assert cut.min_score == 0.6 and cut.precision == 0.75 and cut.coverage == 0.8
    assert cutoff_for_precision(scores, correct, 0.9).min_score == 0.8
    assert cutoff_for_precision(scores, correct, 0.6).min_score == 0.5


def test_tied_scores_pass_or_fail_together():
    scores = np.array([0.9, 0.8, 0.8, 0.8])
    correct = np.array([True, True, False, False])
    cut = cutoff_for_precision(scores, correct, 0.9)
    assert cut.min_score == 0.9 and cut.coverage == 0.25  # 0.8 would let in two wrong hits with one right


def test_an_unreachable_precision_gives_no_cut_off():
    cut = cutoff_for_precision(np.array([0.9, 0.1]), np.array([False, True]), 0.9)
    assert cut.min_score is None and cut.precision is None and cut.coverage == 0.0


@pytest.mark.parametrize(
    ("scores", "correct", "precision"),
    [
        ([0.5], [True], 0.0),
        ([0.5], [True], 1.5),
        ([], [], 0.9),
        ([0.5, 0.4], [True], 0.9),
        ([float("nan")], [True], 0.9),
    ],
)
def test_bad_calibration_input_is_refused(scores, correct, precision):
    with pytest.raises(CalibrationError):
        cutoff_for_precision(np.array(scores), np.array(correct, dtype=bool), precision)


@pytest.fixture(scope="module")
def checkpoint_and_manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("calib")
    lib = generate_library(
        out / "lib", families=2, seed=3, holdout=0.5, size=32, fps=12, seconds=1.0, workers=1
    )
    save_checkpoint(load_model("tiny"), out / "model")
    return out / "model", lib.test, out / "cache"


def test_cli_writes_the_cut_off_beside_the_checkpoint(checkpoint_and_manifest, capsys):
    folder, manifest, cache = checkpoint_and_manifest
    args = [str(folder), "--manifest", str(manifest), "--cache-dir", str(cache), "--workers", "1"]
    assert main([*args, "--dry-run"]) == 0
    assert not (folder / CALIBRATION_FILE).exists()
    assert json.loads(capsys.readouterr().out)["precision_target"] == 0.9
    assert main([*args, "--precision", "0.5", "--describe", "two generated families"]) == 0
    calibration = read_calibration(folder)
    assert calibration is not None
    assert json.loads(capsys.readouterr().out) == json.loads(calibration.to_json())
    assert calibration.model_id == load_model(str(folder)).model_id
    assert calibration.precision_target == 0.5 and calibration.queries == 6 and calibration.videos == 6
    assert calibration.validation_set == "two generated families" and calibration.dtype == "float32"
    assert set(calibration.cutoffs) == {"two_stage", "broad"}
    # The tiny preset's focused view starts at zero: both kinds rank and score alike.
    assert calibration.cutoffs["two_stage"] == calibration.cutoffs["broad"]
    for cut in calibration.cutoffs.values():
        if cut.min_score is not None:
            assert cut.precision is not None and cut.precision >= 0.5
            assert (cut.coverage * 6) == pytest.approx(round(cut.coverage * 6))


def test_cli_explains_bad_arguments(checkpoint_and_manifest, tmp_path, capsys):
    folder, manifest, _ = checkpoint_and_manifest
    with pytest.raises(SystemExit) as e:
        main([str(folder), "--manifest", str(manifest), "--precision", "1.5"])
    assert e.value.code == 2 and "--precision must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--manifest", str(manifest)])
    assert e.value.code == 2 and "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "two_stage" in capsys.readouterr().out
