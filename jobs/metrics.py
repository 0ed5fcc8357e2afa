"""Evaluation metrics per task, all from sklearn.metrics, plus which direction is better."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from jobs.config import LOWER_IS_BETTER, TASK_METRICS

HEADLINE = {  # the metrics summaries, reports and CV show, per task
    "binary": ("roc_auc", "pr_auc", "precision", "recall", "f1", "brier", "log_loss"),
    "multiclass": ("log_loss", "accuracy", "macro_f1", "macro_pr_auc"),
    "regression": ("rmse", "mae", "r2"),
}


def primary_metric(task: str, configured: str | None) -> str:
    """The promotion metric: the configured one, or the task's default."""
    return configured or TASK_METRICS[task][0]


def beats(metric: str, new: float | None, old: float | None, margin: float) -> bool:
    """Whether `new` beats `old` by `margin` in the metric's better direction."""
    if new is None or not np.isfinite(new):
        return False
    if old is None or not np.isfinite(old):
        return True
    improvement = old - new if metric in LOWER_IS_BETTER else new - old
    return improvement > margin  # a tie is not a win


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
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
        "log_loss": float(skm.log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "brier": float(skm.brier_score_loss(labels, scores)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def multiclass_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Log loss, accuracy, macro F1 and one-vs-rest PR per class."""
    indices = list(range(len(classes)))
    predicted = probabilities.argmax(axis=1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predicted, labels=indices, zero_division=0
    )
    per_class = {}
    for index, name in enumerate(classes):
        truth = (labels == index).astype(int)
        present = 0 < truth.sum() < len(truth)
        per_class[name] = {
            "support": int(support[index]),
            "precision": float(precision[index]),
            "recall": float(recall[index]),
            "f1": float(f1[index]),
            "pr_auc": float(skm.average_precision_score(truth, probabilities[:, index]))
            if present
            else None,
        }
    aucs = [c["pr_auc"] for c in per_class.values() if c["pr_auc"] is not None]
    return {
        "rows": int(len(labels)),
        "log_loss": float(skm.log_loss(labels, probabilities, labels=indices)),
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "macro_f1": float(
            skm.f1_score(labels, predicted, labels=indices, average="macro", zero_division=0)
        ),
        "macro_pr_auc": float(np.mean(aucs)) if aucs else None,
        "per_class": per_class,
        "confusion": skm.confusion_matrix(labels, predicted, labels=indices).tolist(),
    }


def regression_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict:
    return {
        "rows": int(len(targets)),
        "rmse": float(np.sqrt(skm.mean_squared_error(targets, predictions))),
        "mae": float(skm.mean_absolute_error(targets, predictions)),
        "r2": float(skm.r2_score(targets, predictions)) if len(targets) > 1 else None,
        "target_mean": float(np.mean(targets)) if len(targets) else None,
    }


def task_metrics(
    task: str, labels: np.ndarray, scores: np.ndarray, threshold: float | None, classes: list[str]
) -> dict:
    """The metrics of one task on one set of rows (scores: probabilities, or predictions)."""
    if task == "binary":
        return binary_metrics(labels.astype(int), scores, threshold)
    if task == "multiclass":
        return multiclass_metrics(labels.astype(int), scores, classes)
    return regression_metrics(labels, scores)
