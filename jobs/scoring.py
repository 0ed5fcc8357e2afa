"""From model inputs to what users get back, per task; shared by evaluation, batch inference,
the promotion gate and the HTTP endpoint so they can never disagree.

binary: a calibrated probability and a 0/1 label at the bundle's threshold;
multiclass: a probability per class and the most likely class's name;
regression: the predicted value.
"""

from __future__ import annotations

import numpy as np
import xgboost as xgb

from jobs.calibration import calibrate


def model_scores(
    booster: xgb.Booster, matrix: np.ndarray, task: str, calibration: dict | None = None
) -> np.ndarray:
    """Binary: calibrated probabilities (n,); multiclass: probabilities (n, classes);
    regression: values (n,)."""
    if len(matrix) == 0:  # the right shape (classes) for an empty request or batch
        dummy = np.zeros((1, booster.num_features()), np.float32)
        return booster.inplace_predict(dummy)[:0].astype(np.float64)
    raw = booster.inplace_predict(matrix)
    return calibrate(calibration, raw) if task == "binary" else raw


def predictions(scores: np.ndarray, task: str, threshold: float | None, classes: list[str]):
    """One JSON-ready prediction per row."""
    if task == "binary":
        return [{"score": float(s), "label": int(s >= threshold)} for s in scores]
    if task == "multiclass":
        return [
            {
                "label": classes[int(np.argmax(row))],
                "probabilities": {name: float(p) for name, p in zip(classes, row, strict=True)},
            }
            for row in scores
        ]
    return [{"value": float(value)} for value in scores]
