"""Drift: reference distributions of model inputs and scores, and the Population Stability Index.

At publish time the pipeline bins a deterministic sample (<= 100k rows) of the train split's
model inputs, and the model's scores on them, into `reference.json` inside the bundle. Serving
(`serving.monitoring`) bins a window of live feature rows with the same edges and reports PSI
per feature, so drift is measured against what the model actually learned from.

Binning, per feature (the same rules for the score):
- at most `max(bins, 20)` distinct values (constants, encoded categories, flags): one bin per
  value plus an `other` bin for values never seen in training (a new category code);
- otherwise `bins` quantile bins; the edges are inner cut points, a value `x` falls in bin
  `searchsorted(edges, x, side="right")` (ties of a heavy value collapse duplicate edges);
- non-finite values (NaN, +-inf) are counted in a `missing` bin.
Shares are fractions of all rows, so `[*shares, (other,) missing]` sums to 1.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from scipy.special import rel_entr

from jobs.storage import Storage, join

FORMAT = 1
EPSILON = 1e-4  # stands in for an empty bin's share, so PSI stays finite
MIN_DISCRETE = 20  # up to this many distinct values (or `bins`, if larger) is one bin each
PERCENTILES = np.linspace(0.0, 1.0, 101)
MAX_SAMPLE_ROWS = 100_000


def binning(values: np.ndarray, bins: int = 10) -> dict:
    """The bins of one column (see the module docstring) and the share of rows in each."""
    values = np.asarray(values, dtype=np.float64).ravel()
    total = max(values.size, 1)
    finite = values[np.isfinite(values)]
    missing = (values.size - finite.size) / total
    distinct, counts = np.unique(finite, return_counts=True)
    if distinct.size <= max(bins, MIN_DISCRETE):
        return {
            "kind": "discrete",
            "values": distinct.tolist(),
            "shares": (counts / total).tolist(),
            "missing": missing,
        }
    edges = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=edges.size + 1)
    return {
        "kind": "quantile",
        "edges": edges.tolist(),
        "shares": (counts / total).tolist(),
        "missing": missing,
    }


def score_column(scores: np.ndarray) -> np.ndarray:
    """The score drift is measured on: the score itself, or the first column of a matrix of
    class probabilities."""
    scores = np.asarray(scores, dtype=np.float64)
    return scores[:, 0] if scores.ndim == 2 else scores


def reference(
    matrix: np.ndarray, feature_names: list[str], scores: np.ndarray | None, bins: int = 10
) -> dict:
    """Reference distributions (JSON-ready) of each model input and of the scores.

    Args:
        matrix: model inputs, shape (rows, features), in `feature_names` order.
        scores: what serving returns as the score for the same rows (calibrated probabilities
            for binary, class probabilities for multiclass, values for regression), or None.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[1] != len(feature_names):
        raise ValueError(
            f"reference: matrix of shape {matrix.shape} for {len(feature_names)} features"
        )
    result: dict = {
        "format": FORMAT,
        "rows": int(matrix.shape[0]),
        "bins": bins,
        "features": {
            name: binning(matrix[:, index], bins) for index, name in enumerate(feature_names)
        },
        "score": None,
    }
    if scores is not None and len(scores):
        column = score_column(scores)
        finite = column[np.isfinite(column)]
        result["score"] = {
            **binning(column, bins),
            "percentiles": np.quantile(finite, PERCENTILES).tolist() if finite.size else [],
        }
    return result


def bin_shares(reference_feature: dict, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(expected, actual): the reference's shares and the shares of `values` in its bins,
    both ending with the `missing` bin (and `other` before it for a discrete column)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    finite_mask = np.isfinite(values)
    finite = values[finite_mask]
    shares = reference_feature["shares"]
    if reference_feature["kind"] == "discrete":
        known = np.asarray(reference_feature["values"], dtype=np.float64)
        index = np.searchsorted(known, finite)
        hit = index < known.size
        hit[hit] = known[index[hit]] == finite[hit]
        index = np.where(hit, index, known.size)  # `other`
        expected = [*shares, 0.0, reference_feature["missing"]]
    else:
        edges = np.asarray(reference_feature["edges"], dtype=np.float64)
        index = np.searchsorted(edges, finite, side="right")
        expected = [*shares, reference_feature["missing"]]
    bins = len(expected) - 1
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    actual = np.append(counts, values.size - finite.size) / max(values.size, 1)
    return np.asarray(expected, dtype=np.float64), actual


def psi(reference_feature: dict, values: np.ndarray) -> float:
    """Population Stability Index of `values` against a reference column:
    sum over bins of (actual - expected) * ln(actual / expected), empty bins at EPSILON.
    Below 0.1 is stable, 0.1-0.2 a moderate shift, above 0.2 a shift worth an alert.
    NaN when there are no values."""
    if np.size(values) == 0:
        return float("nan")
    expected, actual = bin_shares(reference_feature, values)
    p, q = np.maximum(actual, EPSILON), np.maximum(expected, EPSILON)
    # Symmetric KL divergence is PSI: rel_entr(p, q) + rel_entr(q, p) = (p - q) ln(p / q).
    return float(np.sum(rel_entr(p, q) + rel_entr(q, p)))


def feature_psi(ref: dict, matrix: np.ndarray, feature_names: list[str]) -> dict:
    """PSI per feature of a matrix of model inputs (features missing from the reference are
    skipped)."""
    features = ref["features"]
    return {
        name: psi(features[name], matrix[:, index])
        for index, name in enumerate(feature_names)
        if name in features
    }


def score_rank(reference_score: dict, scores: np.ndarray) -> np.ndarray:
    """Each score's position (0..1) in the reference score distribution: uniform when the
    scores have not drifted, whatever the model's scale."""
    percentiles = reference_score.get("percentiles") or []
    column = score_column(scores)
    if not percentiles:
        return np.full(column.shape, np.nan)
    return np.interp(column, percentiles, PERCENTILES)


def train_sample(
    storage: Storage,
    run_uri: str,
    feature_names: list[str],
    max_rows: int = MAX_SAMPLE_ROWS,
    seed: int = 0,
) -> np.ndarray:
    """A deterministic sample (about `max_rows`) of the train split's model inputs, read from
    the features stage's output with only the feature columns."""
    uri = join(run_uri, "features", "train")
    files = storage.list_files(uri)
    fs, _ = storage.filesystem(uri)
    paths = [f.removeprefix("s3://") for f in files]
    rows = sum(pq.ParquetFile(path, filesystem=fs).metadata.num_rows for path in paths)
    fraction = min(1.0, max_rows / max(rows, 1))
    parts = []
    for index, path in enumerate(paths):
        table = pq.read_table(path, filesystem=fs, columns=feature_names)
        keep = np.random.default_rng([seed, index]).random(table.num_rows) < fraction
        columns = [
            table.column(name).to_numpy(zero_copy_only=False)[keep] for name in feature_names
        ]
        parts.append(np.column_stack(columns) if columns else np.empty((int(keep.sum()), 0)))
    if not parts:
        return np.empty((0, len(feature_names)), np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def bundle_reference(
    storage: Storage, run_uri: str, model_uri: str, calibration: dict | None
) -> dict:
    """The `reference.json` of a run's bundle: train-split inputs and the served scores on them."""
    from jobs.boosting import load_booster
    from jobs.featurespec import FeatureSpec
    from jobs.scoring import model_scores

    spec = FeatureSpec.model_validate(
        storage.read_json(join(run_uri, "features", "feature_spec.json"))
    )
    matrix = train_sample(storage, run_uri, spec.feature_names)
    booster = load_booster(storage, model_uri)
    scores = model_scores(booster, matrix, spec.task, calibration)
    return reference(matrix, spec.feature_names, scores)
