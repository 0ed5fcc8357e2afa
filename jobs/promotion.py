"""The promotion gate: a candidate replaces production only if it wins on the same test rows.

Production is scored with its own bundle (FeatureSpec, calibration, threshold) on the candidate
run's `test_raw` rows, so both models are measured on identical data with the configured
metric, in that metric's better direction, by at least the configured margin.
"""

from __future__ import annotations

import numpy as np

from jobs.config import Config
from jobs.errors import BundleError
from jobs.featurespec import feature_matrix, transform
from jobs.metrics import beats, primary_metric, task_metrics
from jobs.registry import get_alias, load_bundle
from jobs.scoring import model_scores
from jobs.storage import Storage, join


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def promotion_gate(config: Config, run_uri: str, candidate: dict, storage: Storage) -> dict:
    """Whether to promote, and a one-line reason a person can read."""
    rule = config.evaluate.promotion
    metric = primary_metric(config.task, rule.metric)
    registry_uri = join(config.storage, "registry")
    if get_alias(storage, registry_uri, config.name, "production") is None:
        return {"promote": True, "metric": metric, "reason": "no production model yet"}
    try:
        production = load_bundle(storage, registry_uri, config.name)
    except BundleError as error:  # never replace a model we could not compare against
        return {
            "promote": False,
            "reason": f"production cannot be loaded ({error}); "
            "fix it or promote by hand with `rayline models promote`",
        }
    spec = production.spec
    if spec.task != config.task:
        return {
            "promote": False,
            "production_version": production.version,
            "reason": f"production v{production.version} is a {spec.task} model, the candidate "
            f"is {config.task}; promote by hand with `rayline models promote`",
        }
    test_raw = storage.read_table_dir(join(run_uri, "features", "test_raw"))
    needed = [*spec.features.numeric, *spec.features.time_features, *spec.features.categorical]
    missing = sorted(set(needed) - set(test_raw.column_names))
    if missing:
        return {
            "promote": False,
            "production_version": production.version,
            "reason": f"production v{production.version} needs columns {missing} that this "
            "run does not produce; compare by hand and use `rayline models promote`",
        }
    matrix = feature_matrix(transform(test_raw, spec), spec.feature_names)
    scores = model_scores(production.booster, matrix, spec.task, production.calibration)
    labels = test_raw.column(config.features.label).to_numpy(zero_copy_only=False)
    labels = labels if spec.task == "regression" else labels.astype(np.int64)
    current = task_metrics(spec.task, labels, scores, production.threshold, spec.classes)
    new, old = candidate.get(metric), current.get(metric)
    promote = beats(metric, new, old, rule.min_improvement)
    verdict = "beats" if promote else "does not beat"
    return {
        "promote": promote,
        "production_version": production.version,
        "candidate": new,
        "production": old,
        "metric": metric,
        "reason": f"candidate {metric} {_number(new)} {verdict} production "
        f"v{production.version} {_number(old)} by margin {rule.min_improvement}",
    }
