"""A self-contained HTML evaluation report: plots embedded as PNG data URIs, no external files.

Binary: ROC, precision-recall, calibration before and after, confusion at the threshold.
Multiclass: confusion matrix and one-vs-rest metrics per class. Regression: predicted against
actual and residuals. Every report says how the rows were split and shows slices.
"""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from jobs.metrics import HEADLINE  # noqa: E402


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure(title: str):
    figure, axis = plt.subplots(figsize=(4, 3.4))
    axis.set_title(title)
    return figure, axis


def _binary_plots(labels, scores, metrics) -> list[tuple[str, str]]:
    plots = []
    figure, axis = _figure("ROC")
    skm.RocCurveDisplay.from_predictions(labels, scores, ax=axis)
    plots.append(("ROC curve", _png(figure)))
    figure, axis = _figure("Precision-recall")
    skm.PrecisionRecallDisplay.from_predictions(labels, scores, ax=axis)
    axis.axhline(labels.mean(), linestyle="--", color="grey", label="base rate")
    plots.append(("Precision-recall curve", _png(figure)))
    calibration = metrics["calibration"]
    figure, axis = _figure(f"Calibration ({calibration['method']}, quantile bins)")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey")
    for name in ("before", "after"):
        curve = calibration[name]
        axis.plot(curve["mean_score"], curve["fraction_positive"], marker="o", label=name)
    axis.set_xlabel("mean predicted score")
    axis.set_ylabel("fraction positive")
    axis.legend()
    plots.append(("Calibration before and after", _png(figure)))
    return plots


def _regression_plots(targets, predictions) -> list[tuple[str, str]]:
    """Predicted vs actual and residuals; skipped (not fatal) when values overflow a plot."""
    residuals = np.asarray(predictions, np.float64) - np.asarray(targets, np.float64)
    if not (np.isfinite(residuals).all() and np.ptp(residuals) < 1e300):
        return []
    figure, axis = _figure("Predicted vs actual")
    axis.scatter(targets, predictions, s=4, alpha=0.4)
    low, high = float(np.min(targets)), float(np.max(targets))
    axis.plot([low, high], [low, high], linestyle="--", color="grey")
    axis.set_xlabel("actual")
    axis.set_ylabel("predicted")
    first = ("Predicted vs actual", _png(figure))
    figure, axis = _figure("Residuals")
    axis.hist(residuals, bins="auto" if np.ptp(residuals) > 0 else 1)
    return [first, ("Residuals", _png(figure))]


def _importance_plot(metrics) -> list[tuple[str, str]]:
    importance = list(metrics["importance"].items())[:15][::-1]
    if not importance:
        return []
    figure, axis = plt.subplots(figsize=(4.5, 3.8))
    axis.barh([name for name, _ in importance], [value for _, value in importance])
    axis.set_title("Feature importance (gain)")
    return [("Feature importance", _png(figure))]


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _slice_table(slices: dict, task: str) -> str:
    columns = list(HEADLINE[task][:4])
    rows = [
        [column, value, m["rows"], *[m.get(c) for c in columns]]
        for column, values in slices.items()
        for value, m in values.items()
    ]
    return _table(["slice", "value", "rows", *columns], rows)


def _details(metrics: dict) -> str:
    task = metrics["task"]
    if task == "binary":
        c = metrics["confusion"]
        rate = metrics["positives"] / max(metrics["rows"], 1)
        return (
            f"<p>{metrics['positives']:,} positives (base rate {rate:.4f}). Scores are "
            f"calibrated probabilities ({html.escape(metrics['calibration']['method'])}, fitted "
            f"on the valid split); threshold {metrics['threshold']:.4f} chosen on valid by rule "
            f"<code>{html.escape(metrics['threshold_rule']['rule'])}</code>.</p>"
            "<h2>Confusion matrix at the threshold</h2>"
            + _table(
                ["", "predicted 0", "predicted 1"],
                [["actual 0", c["tn"], c["fp"]], ["actual 1", c["fn"], c["tp"]]],
            )
        )
    if task == "multiclass":
        classes = metrics["classes"]
        confusion = [
            [f"actual {name}", *row]
            for name, row in zip(classes, metrics["confusion"], strict=True)
        ]
        per_class = [
            [name, m["support"], m["precision"], m["recall"], m["f1"], m["pr_auc"]]
            for name, m in metrics["per_class"].items()
        ]
        return (
            "<h2>Per class (one vs rest)</h2>"
            + _table(["class", "support", "precision", "recall", "F1", "PR-AUC"], per_class)
            + "<h2>Confusion matrix</h2>"
            + _table(["", *[f"predicted {n}" for n in classes]], confusion)
        )
    return f"<p>Mean target on test: {_cell(metrics.get('target_mean'))}.</p>"


def write_html_report(
    metrics: dict, labels: np.ndarray, scores: np.ndarray, raw: np.ndarray | None = None
) -> str:
    """Returns the HTML text of the evaluation report."""
    task = metrics["task"]
    cells = "".join(
        f"<tr><th>{name}</th><td>{_cell(metrics.get(name))}</td></tr>" for name in HEADLINE[task]
    )
    if task == "binary":
        plots = _binary_plots(labels, scores, metrics)
    elif task == "regression":
        plots = _regression_plots(labels, scores)
    else:
        plots = []
    images = "".join(
        f'<figure><img alt="{title}" src="{uri}"><figcaption>{title}</figcaption></figure>'
        for title, uri in [*plots, *_importance_plot(metrics)]
    )
    split = metrics.get("split", {})
    how = html.escape(str(split.get("by", "random")))
    stratified = " (stratified by class)" if split.get("stratified") else ""
    fractions = ", ".join(f"{k} {split[k]:.0%}" for k in ("train", "valid", "test") if k in split)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>rayline evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
figure{{display:inline-block}}</style>
</head><body><h1>Evaluation on the test split ({html.escape(task)})</h1>
<p>{metrics["rows"]:,} test rows. Split: <b>{how}</b>{stratified}; {fractions}.</p>
<table>{cells}</table>
{_details(metrics)}
<h2>Plots</h2>{images}
<h2>Slices</h2>{_slice_table(metrics["slices"], task)}
</body></html>"""
