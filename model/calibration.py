"""A model's default score cut-off: how it is found, and `calibration.json`, the file it lives in."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import ModelError, UserError

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
CALIBRATION_VERSION = 1
DEFAULT_PRECISION = 0.9
# "two_stage": S = S' + delta of the top-1 after the focused view re-ranked the top-k (what a search with
# rerank on returns); "broad": S' of the broad view's top-1 (rerank off).
SCORE_KINDS = ("two_stage", "broad")
METHOD = (
    "the lowest top-1 score s such that, over the validation queries whose top-1 hit scores >= s, the "
    "top-1 hit is the query's own clip for at least `precision_target` of them"
)


class CalibrationError(ModelError, UserError, ValueError):
    """A calibration file that cannot be read, or a calibration that cannot be computed."""


@dataclass(frozen=True)
class Cutoff:
    min_score: float | None  # None: no score reaches the precision target on the validation set
    precision: float | None  # reached on the validation queries at or above min_score
    coverage: float  # fraction of validation queries whose top-1 hit scores >= min_score


@dataclass(frozen=True)
class Calibration:
    precision_target: float
    cutoffs: dict[str, Cutoff]  # by score kind (SCORE_KINDS)
    queries: int  # validation captions
    videos: int  # distinct validation clips (the gallery each query was ranked against)
    model_id: str  # the weights it was measured on; another model's file is not used
    top_k: int
    dtype: str  # the precision the model ran in while calibrating
    created_at: str  # ISO 8601, UTC
    validation_set: str  # what the queries came from (a manifest path, an MSR-VTT split)
    method: str = METHOD
    version: int = CALIBRATION_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def min_score(self, kind: str) -> float | None:
        cutoff = self.cutoffs.get(kind)
        return None if cutoff is None else cutoff.min_score

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        if data.get("version") != CALIBRATION_VERSION:
            raise CalibrationError(f"unsupported calibration version {data.get('version')!r}")
        try:
            cutoffs = {kind: Cutoff(**value) for kind, value in data["cutoffs"].items()}
            return cls(**{**data, "cutoffs": cutoffs})
        except (KeyError, TypeError, AttributeError) as e:
            raise CalibrationError(f"not a calibration record: {e}") from e


def cutoff_for_precision(scores: np.ndarray, correct: np.ndarray, precision: float) -> Cutoff:
    """The lowest top-1 score above which (inclusive) the top-1 hit is right for >= `precision` of queries.

    scores: [Q] each validation query's top-1 score; correct: [Q] whether that top-1 is its own clip.
    Only a score where the sorted scores strictly drop can be a threshold, so ties pass or fail together.
    """
    if not 0.0 < precision <= 1.0:
        raise CalibrationError(f"the precision target must be in (0, 1], got {precision}")
    s = np.asarray(scores, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if s.ndim != 1 or s.shape != ok.shape or not len(s):
        raise CalibrationError(f"need one score and one verdict per query, got {s.shape} and {ok.shape}")
    if not np.isfinite(s).all():
        raise CalibrationError("a validation score is not finite")
    order = np.argsort(-s, kind="stable")
    s, ok = s[order], ok[order]
    passed = np.arange(1, len(s) + 1)
    reached = np.cumsum(ok) / passed
    cut_here = np.append(s[1:] < s[:-1], True)  # position n-1 ends a run of equal scores
    feasible = np.flatnonzero(cut_here & (reached >= precision - 1e-12))
    if not len(feasible):
        return Cutoff(min_score=None, precision=None, coverage=0.0)
    n = int(feasible[-1])  # the most queries answered at the target
    return Cutoff(min_score=float(s[n]), precision=float(reached[n]), coverage=float(passed[n] / len(s)))


def write_calibration(directory: str | os.PathLike[str], calibration: Calibration) -> Path:
    """calibration.json in a checkpoint directory, written atomically."""
    out = Path(directory)
    with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp") as f:
        f.write(calibration.to_json())
    target = out / CALIBRATION_FILE
    os.replace(f.name, target)
    return target


def read_calibration(directory: str | os.PathLike[str]) -> Calibration | None:
    """The checkpoint's calibration; None when it has none (a preset, or never calibrated)."""
    path = Path(directory) / CALIBRATION_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{path} is unreadable: {e}") from e
    if not isinstance(data, dict):
        raise CalibrationError(f"{path} does not hold a JSON object")
    calibration = Calibration.from_dict(data)
    for kind, cutoff in calibration.cutoffs.items():
        if cutoff.min_score is not None and not math.isfinite(cutoff.min_score):
            raise CalibrationError(f"{path}: the {kind} cut-off is not a finite number")
    return calibration
