"""Evaluate: threshold chosen on the valid split, honest metrics on the test split.

All metrics come from sklearn.metrics. The report (JSON + self-contained HTML) lands next to
the model; `jobs.registry` uses the primary metric for the promotion gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pyarrow as pa
import typer
import xgboost as xgb
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from jobs.boosting import load_booster, to_matrix
from jobs.config import Config, ThresholdConfig, load_config
from jobs.featurespec import FeatureSpec
from jobs.storage import Storage, join


@dataclass
class EvaluationResult:
    metrics: dict
    threshold: float
    threshold_rule: str
    metrics_uri: str
    report_uri: str


def choose_threshold(labels: np.ndarray, scores: np.ndarray, rule: ThresholdConfig) -> float:
    """The decision threshold by the configured rule, computed on validation scores."""
    if rule.rule == "max_f1":
        precision, recall, thresholds = skm.precision_recall_curve(labels, scores)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        return float(thresholds[int(np.argmax(f1[:-1]))])
    fpr, tpr, thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if rule.rule == "target_recall":
        reaching = np.flatnonzero(tpr >= rule.target_recall)
        return float(thresholds[reaching[0]]) if len(reaching) else float(thresholds[-1])
    positives, negatives = labels.sum(), len(labels) - labels.sum()
    cost = (
        fpr * negatives * rule.cost_false_positive
        + (1 - tpr) * positives * rule.cost_false_negative
    )
    return float(thresholds[int(np.argmin(cost))])


def classification_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    predicted = (scores >= threshold).astype(int)
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        labels, predicted, average="binary", zero_division=0
    )
    both_classes = 0 < labels.sum() < len(labels)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    return {
        "rows": int(len(labels)),
        "positives": int(labels.sum()),
        "roc_auc": float(skm.roc_auc_score(labels, scores)) if both_classes else None,
        "pr_auc": float(skm.average_precision_score(labels, scores)) if both_classes else None,
        "log_loss": float(skm.log_loss(labels, scores, labels=[0, 1])),
        "brier": float(skm.brier_score_loss(labels, scores)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def slice_metrics(
    table: pa.Table, labels, scores, threshold: float, spec: FeatureSpec, columns: list[str]
) -> dict:
    """Metrics per value of each slice column (categories decoded back to their names)."""
    result: dict[str, dict] = {}
    for column in columns:
        if column not in table.column_names:
            continue
        codes = table.column(column).to_numpy(zero_copy_only=False).astype(int)
        names = [*spec.categories.get(column, []), "<unknown>"]
        result[column] = {}
        for code in np.unique(codes):
            mask = codes == code
            name = names[code] if column in spec.categories and code < len(names) else str(code)
            result[column][name] = classification_metrics(labels[mask], scores[mask], threshold)
    return result


def predict_split(
    storage: Storage, run_uri: str, split: str, booster: xgb.Booster, spec: FeatureSpec
) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    table = storage.read_table_dir(join(run_uri, "features", split))
    features, labels = to_matrix(table, spec.features.label, spec.feature_names)
    scores = booster.inplace_predict(features)
    return table, labels.astype(int), scores


def evaluate(config: Config, run_uri: str, storage: Storage | None = None) -> EvaluationResult:
    """Scores valid (for the threshold) and test (for the metrics); writes the report."""
    from jobs.report import write_html_report

    storage = storage or Storage(config.s3)
    spec = FeatureSpec.model_validate(
        storage.read_json(join(run_uri, "features", "feature_spec.json"))
    )
    booster = load_booster(storage, join(run_uri, "train", "model.ubj"))
    _, valid_labels, valid_scores = predict_split(storage, run_uri, "valid", booster, spec)
    threshold = choose_threshold(valid_labels, valid_scores, config.evaluate.threshold)
    table, labels, scores = predict_split(storage, run_uri, "test", booster, spec)
    metrics = classification_metrics(labels, scores, threshold)
    fraction, mean_score = calibration_curve(labels, scores, n_bins=10, strategy="quantile")
    importance = booster.get_score(importance_type="gain")
    metrics.update(
        threshold=threshold,
        threshold_rule=config.evaluate.threshold.model_dump(),
        valid=classification_metrics(valid_labels, valid_scores, threshold),
        calibration={"mean_score": mean_score.tolist(), "fraction_positive": fraction.tolist()},
        slices=slice_metrics(table, labels, scores, threshold, spec, config.evaluate.slices),
        importance=dict(sorted(importance.items(), key=lambda item: -item[1])),
    )
    out = join(run_uri, "evaluate")
    result = EvaluationResult(
        metrics,
        threshold,
        config.evaluate.threshold.rule,
        join(out, "metrics.json"),
        join(out, "report.html"),
    )
    storage.write_json(result.metrics_uri, metrics)
    storage.write_bytes(result.report_uri, write_html_report(metrics, labels, scores).encode())
    return result


def main(
    config: Annotated[str, typer.Option(help="Path to the pipeline config YAML")],
    run: Annotated[str, typer.Option(help="Run URI with features/ and train/ outputs")],
) -> None:
    """Evaluate a run's model on its test split and write the HTML report."""
    from jobs.summary import print_rows

    result = evaluate(load_config(config), run)
    keys = ("roc_auc", "pr_auc", "precision", "recall", "f1", "brier", "log_loss")
    print_rows(
        "evaluate",
        {
            **{k: f"{result.metrics[k]:.4f}" for k in keys},
            "threshold": f"{result.threshold:.4f}",
            "report": result.report_uri,
        },
    )


if __name__ == "__main__":
    from jobs.entrypoint import run_cli

    run_cli(main)


def promotion_gate(config: Config, run_uri: str, candidate: dict, storage: Storage) -> dict:
    """Promote only if the candidate beats production on the same test rows by the margin."""
    from jobs.featurespec import feature_matrix, transform
    from jobs.registry import BundleError, get_alias, load_bundle

    rule = config.evaluate.promotion
    registry_uri = join(config.storage, "registry")
    if get_alias(storage, registry_uri, config.name, "production") is None:
        return {"promote": True, "reason": "no production model yet"}
    try:
        production = load_bundle(storage, registry_uri, config.name)
    except BundleError as error:  # never replace a model we could not compare against
        return {
            "promote": False,
            "reason": f"production cannot be loaded ({error}); "
            "fix it or promote by hand with `rayline models promote`",
        }
    test_raw = storage.read_table_dir(join(run_uri, "features", "test_raw"))
    spec = production.spec
    needed = [*spec.features.numeric, *spec.features.time_features, *spec.features.categorical]
    missing = sorted(set(needed) - set(test_raw.column_names))
    if missing:
        return {
            "promote": False,
            "production_version": production.version,
            "reason": f"production v{production.version} needs columns {missing} that this "
            "run does not produce; compare by hand and use `rayline models promote`",
        }
    scores = production.booster.inplace_predict(
        feature_matrix(transform(test_raw, spec), spec.feature_names)
    )
    labels = test_raw.column(config.features.label).to_numpy(zero_copy_only=False).astype(int)
    current = classification_metrics(labels, scores, production.threshold)
    new, old = candidate[rule.metric], current[rule.metric]
    promote = new is not None and (old is None or new >= old + rule.min_improvement)
    verdict = "beats" if promote else "does not beat"
    return {
        "promote": promote,
        "production_version": production.version,
        "candidate": new,
        "production": old,
        "metric": rule.metric,
        "reason": f"candidate {rule.metric} {_number(new)} {verdict} production "
        f"v{production.version} {_number(old)} + margin {rule.min_improvement}",
    }


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
