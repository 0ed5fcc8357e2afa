"""Score calibration for binary models: raw XGBoost scores -> probabilities.

`scale_pos_weight` and down-sampling shift raw scores far from probabilities (a typical
legitimate transaction scored 0.5-0.9). A calibration map is fitted on the valid split with
sklearn (isotonic or Platt) and stored as plain numbers in the bundle; `calibrate` applies it
with numpy, the same function online, in batch and in evaluation.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel


class Calibration(BaseModel):
    """A fitted calibration map, as data: isotonic knots (x -> y, linear between them) or a
    Platt sigmoid over the raw score's logit."""

    method: Literal["isotonic", "platt", "none"] = "none"
    x: list[float] = []
    y: list[float] = []
    slope: float = 1.0
    intercept: float = 0.0


def _logit(scores: np.ndarray) -> np.ndarray:
    clipped = np.clip(scores.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(clipped / (1 - clipped))


def fit_calibration(labels: np.ndarray, scores: np.ndarray, method: str) -> Calibration:
    """Fits the map on held-out scores (the valid split, never test)."""
    if method == "none" or len(np.unique(labels)) < 2:
        return Calibration(method="none")
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        fitted = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
        fitted.fit(scores.astype(np.float64), labels.astype(np.float64))
        return Calibration(
            method="isotonic",
            x=fitted.X_thresholds_.tolist(),
            y=fitted.y_thresholds_.tolist(),
        )
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1e6).fit(_logit(scores).reshape(-1, 1), labels.astype(int))
    return Calibration(
        method="platt", slope=float(model.coef_[0, 0]), intercept=float(model.intercept_[0])
    )


def calibrate(calibration: Calibration | dict | None, scores: np.ndarray) -> np.ndarray:
    """Applies a stored map; no map (or `none`) returns the scores unchanged."""
    if calibration is None:
        return scores
    if isinstance(calibration, dict):
        calibration = Calibration.model_validate(calibration)
    if calibration.method == "isotonic":
        return np.interp(scores, calibration.x, calibration.y)
    if calibration.method == "platt":
        z = calibration.slope * _logit(scores) + calibration.intercept
        return 1.0 / (1.0 + np.exp(-z))
    return scores
