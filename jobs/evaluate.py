"""Evaluate: calibration and threshold chosen on the valid split, honest metrics on test.

Binary scores are calibrated on valid (isotonic or Platt, `jobs.calibration`) before the
threshold is chosen, so `score` everywhere is a probability. All metrics come from
sklearn.metrics (`jobs.metrics`). The report (JSON + self-contained HTML) lands in the
training's own folder, `evaluate/<training id>/`; `jobs.promotion` gates on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pyarrow as pa
import typer
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from jobs.boosting import load_booster, to_matrix
from jobs.calibration import Calibration, calibrate, fit_calibration
from jobs.config import Config, ThresholdConfig, load_config
from jobs.entrypoint import run_cli
from jobs.featurespec import FeatureSpec
from jobs.metrics import task_metrics
from jobs.runs import latest_model
from jobs.scoring import model_scores
from jobs.storage import Storage, join


@dataclass
class EvaluationResult:
    metrics: dict
    threshold: float | None
    threshold_rule: str
    metrics_uri: str
    report_uri: str
    calibration: dict
    calibration_uri: str
    task: str = "binary"


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


def slice_metrics(
    table: pa.Table, labels, scores, threshold: float | None, spec: FeatureSpec, columns: list[str]
) -> dict:
    """Metrics per value of each slice column (categories decoded back to their names)."""
    result: dict[str, dict] = {}
    for column in columns:
        codes = table.column(column).to_numpy(zero_copy_only=False).astype(int)
        names = [*spec.categories.get(column, []), "<unknown>"]
        result[column] = {}
        for code in np.unique(codes):
            mask = codes == code
            name = names[code] if column in spec.categories and code < len(names) else str(code)
            result[column][name] = task_metrics(
                spec.task, labels[mask], scores[mask], threshold, spec.classes
            )
    return result


def raw_split_scores(
    storage: Storage, run_uri: str, split: str, booster, spec: FeatureSpec
) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """A split's table, labels and uncalibrated model scores."""
    table = storage.read_table_dir(join(run_uri, "features", split))
    features, labels = to_matrix(table, spec.features.label, spec.feature_names)
    scores = model_scores(booster, features, spec.task)
    return table, (labels if spec.task == "regression" else labels.astype(int)), scores


def evaluate(
    config: Config, run_uri: str, storage: Storage | None = None, model_uri: str | None = None
) -> EvaluationResult:
    """Calibrates and picks the threshold on valid, measures on test, writes the report."""
    from jobs.report import write_html_report

    storage = storage or Storage(config.s3)
    spec = FeatureSpec.model_validate(
        storage.read_json(join(run_uri, "features", "feature_spec.json"))
    )
    split_record = storage.read_json(join(run_uri, "features", "_report.json")).get("split", {})
    model_uri = model_uri or latest_model(storage, run_uri)
    booster = load_booster(storage, model_uri)
    _, valid_labels, valid_raw = raw_split_scores(storage, run_uri, "valid", booster, spec)
    table, labels, raw = raw_split_scores(storage, run_uri, "test", booster, spec)
    calibration, threshold, rule = Calibration(method="none"), None, "n/a"
    if spec.task == "binary":
        calibration = fit_calibration(valid_labels, valid_raw, config.evaluate.calibration)
        valid_scores = calibrate(calibration, valid_raw)
        threshold = choose_threshold(valid_labels, valid_scores, config.evaluate.threshold)
        rule = config.evaluate.threshold.rule
        scores = calibrate(calibration, raw)
    else:
        valid_scores, scores = valid_raw, raw
    metrics = task_metrics(spec.task, labels, scores, threshold, spec.classes)
    importance = booster.get_score(importance_type="gain")
    metrics.update(
        task=spec.task,
        classes=spec.classes,
        split=split_record,
        model_uri=model_uri,
        threshold=threshold,
        threshold_rule=config.evaluate.threshold.model_dump() if threshold is not None else None,
        valid=task_metrics(spec.task, valid_labels, valid_scores, threshold, spec.classes),
        slices=slice_metrics(table, labels, scores, threshold, spec, config.evaluate.slices),
        importance=dict(sorted(importance.items(), key=lambda item: -item[1])),
    )
    if spec.task == "binary":
        metrics["calibration"] = _calibration_curves(labels, raw, scores, calibration)
    training_id = model_uri.rstrip("/").rsplit("/", 2)[-2]
    out = join(run_uri, "evaluate", training_id)
    result = EvaluationResult(
        metrics,
        threshold,
        rule,
        join(out, "metrics.json"),
        join(out, "report.html"),
        calibration.model_dump(),
        join(out, "calibration.json"),
        spec.task,
    )
    storage.write_json(result.metrics_uri, metrics)
    storage.write_json(result.calibration_uri, result.calibration)
    report = write_html_report(metrics, labels, scores, raw)
    storage.write_bytes(result.report_uri, report.encode())
    return result


def _calibration_curves(labels, raw, calibrated, calibration: Calibration) -> dict:
    """Reliability curves on test before and after calibration (quantile bins)."""

    def curve(scores) -> dict:
        fraction, mean_score = calibration_curve(labels, scores, n_bins=10, strategy="quantile")
        return {"mean_score": mean_score.tolist(), "fraction_positive": fraction.tolist()}

    return {
        "method": calibration.method,
        "before": curve(raw),
        "after": curve(calibrated),
        "brier_before": float(skm.brier_score_loss(labels, raw)),
        "brier_after": float(skm.brier_score_loss(labels, calibrated)),
    }


def main(
    config: Annotated[str, typer.Option(help="Path to the pipeline config YAML")],
    run: Annotated[str, typer.Option(help="Run URI with features/ and train/ outputs")],
    model: Annotated[str, typer.Option(help="Model URI (default: the run's latest)")] = "",
) -> None:
    """Evaluate a run's model on its test split and write the HTML report."""
    from jobs.summary import print_evaluation

    print_evaluation(evaluate(load_config(config), run, model_uri=model or None))


if __name__ == "__main__":
    run_cli(main)
