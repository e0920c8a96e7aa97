"""The model's default min_score: its calibration file, used only if it was measured on these weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from model.calibration import CALIBRATION_FILE, Calibration, CalibrationError, read_calibration

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefaultCutoff:
    calibration: Calibration | None  # None: searches without a min_score keep every hit
    note: str  # where the cut-off comes from, or why there is none

    def min_score(self, rerank: bool) -> float | None:
        """The cut-off for the score a search returns: two-stage with rerank on, broad without."""
        if self.calibration is None:
            return None
        return self.calibration.min_score("two_stage" if rerank else "broad")


def load_default_cutoff(model_spec: str, model_id: str) -> DefaultCutoff:
    """The calibration stored beside a checkpoint directory (`python -m model.calibrate`), if it fits."""
    folder = Path(model_spec).expanduser()
    if not folder.is_dir():
        return DefaultCutoff(None, f"no cut-off: the model {model_spec!r} is not a checkpoint directory")
    try:
        calibration = read_calibration(folder)
    except CalibrationError as e:
        logger.warning("ignoring the model's calibration, searches keep every hit: %s", e)
        return DefaultCutoff(None, f"no cut-off: {folder / CALIBRATION_FILE} is unreadable ({e})")
    if calibration is None:
        return DefaultCutoff(
            None, f"no cut-off: {folder} has no {CALIBRATION_FILE} (python -m model.calibrate makes one)"
        )
    if calibration.model_id != model_id:
        logger.warning(
            "ignoring %s: it was measured on model %s, not on the loaded %s; run python -m model.calibrate",
            folder / CALIBRATION_FILE,
            calibration.model_id,
            model_id,
        )
        return DefaultCutoff(
            None,
            f"no cut-off: {folder / CALIBRATION_FILE} was measured on model {calibration.model_id}, not "
            f"{model_id} (python -m model.calibrate measures it again)",
        )
    return DefaultCutoff(
        calibration,
        f"top-1 precision {calibration.precision_target:g} on {calibration.queries} validation queries "
        f"({calibration.validation_set}), {calibration.created_at}",
    )
