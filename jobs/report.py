"""A self-contained HTML evaluation report: plots embedded as PNG data URIs, no external files."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _curves(labels: np.ndarray, scores: np.ndarray, metrics: dict) -> list[tuple[str, str]]:
    plots = []
    figure, axis = plt.subplots(figsize=(4, 3.4))
    skm.RocCurveDisplay.from_predictions(labels, scores, ax=axis)
    axis.set_title("ROC")
    plots.append(("ROC curve", _png(figure)))
    figure, axis = plt.subplots(figsize=(4, 3.4))
    skm.PrecisionRecallDisplay.from_predictions(labels, scores, ax=axis)
    axis.axhline(labels.mean(), linestyle="--", color="grey", label="base rate")
    axis.set_title("Precision-recall")
    plots.append(("Precision-recall curve", _png(figure)))
    figure, axis = plt.subplots(figsize=(4, 3.4))
    calibration = metrics["calibration"]
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey")
    axis.plot(calibration["mean_score"], calibration["fraction_positive"], marker="o")
    axis.set_xlabel("mean predicted score")
    axis.set_ylabel("fraction positive")
    axis.set_title("Calibration (quantile bins)")
    plots.append(("Calibration", _png(figure)))
    importance = list(metrics["importance"].items())[:15][::-1]
    if importance:
        figure, axis = plt.subplots(figsize=(4.5, 3.8))
        axis.barh([name for name, _ in importance], [value for _, value in importance])
        axis.set_title("Feature importance (gain)")
        plots.append(("Feature importance", _png(figure)))
    return plots


def _slice_table(slices: dict) -> str:
    rows = []
    for column, values in slices.items():
        for value, m in values.items():
            auc = "n/a" if m["pr_auc"] is None else f"{m['pr_auc']:.3f}"
            rows.append(
                f"<tr><td>{html.escape(column)}</td><td>{html.escape(str(value))}</td>"
                f"<td>{m['rows']:,}</td><td>{m['positives']:,}</td><td>{auc}</td>"
                f"<td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td><td>{m['f1']:.3f}</td></tr>"
            )
    header = (
        "<tr><th>slice</th><th>value</th><th>rows</th><th>positives</th><th>PR-AUC</th>"
        "<th>precision</th><th>recall</th><th>F1</th></tr>"
    )
    return f"<table>{header}{''.join(rows)}</table>"


def write_html_report(metrics: dict, labels: np.ndarray, scores: np.ndarray) -> str:
    """Returns the HTML text of the evaluation report."""
    headline = ("roc_auc", "pr_auc", "precision", "recall", "f1", "brier", "log_loss")
    cells = "".join(
        f"<tr><th>{name}</th><td>{metrics[name]:.4f}</td></tr>"
        for name in headline
        if metrics.get(name) is not None
    )
    confusion = metrics["confusion"]
    images = "".join(
        f'<figure><img alt="{title}" src="{uri}"><figcaption>{title}</figcaption></figure>'
        for title, uri in _curves(labels, scores, metrics)
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>rayline evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
figure{{display:inline-block}}</style>
</head><body><h1>Evaluation on the test split</h1>
<p>{metrics["rows"]:,} rows, {metrics["positives"]:,} positives (base rate
{metrics["positives"] / max(metrics["rows"], 1):.4f}). Threshold {metrics["threshold"]:.4f}
chosen on the valid split by rule <code>{html.escape(metrics["threshold_rule"]["rule"])}</code>.</p>
<table>{cells}</table>
<h2>Confusion matrix at the threshold</h2>
<table><tr><th></th><th>predicted 0</th><th>predicted 1</th></tr>
<tr><th>actual 0</th><td>{confusion["tn"]:,}</td><td>{confusion["fp"]:,}</td></tr>
<tr><th>actual 1</th><td>{confusion["fn"]:,}</td><td>{confusion["tp"]:,}</td></tr></table>
<h2>Plots</h2>{images}
<h2>Slices</h2>{_slice_table(metrics["slices"])}
</body></html>"""
