"""Evaluation: threshold rules, the report, and the promotion gate on the same test rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from jobs import registry
from jobs.config import ThresholdConfig
from jobs.evaluate import choose_threshold
from jobs.metrics import binary_metrics as classification_metrics
from jobs.pipeline import finish_run
from jobs.storage import Storage, join
from tests.conftest import make_config


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(0)
    labels = (rng.random(5000) < 0.05).astype(int)
    scores = np.clip(rng.normal(0.3 + 0.35 * labels, 0.15), 0, 1)
    return labels, scores


def test_max_f1_threshold_reaches_the_best_f1(scored):
    labels, scores = scored
    threshold = choose_threshold(labels, scores, ThresholdConfig(rule="max_f1"))
    best = max(skm.f1_score(labels, scores >= t) for t in np.unique(scores)[::25])
    assert skm.f1_score(labels, scores >= threshold) >= best - 1e-9


def test_target_recall_threshold_is_the_highest_that_reaches_it(scored):
    labels, scores = scored
    threshold = choose_threshold(
        labels, scores, ThresholdConfig(rule="target_recall", target_recall=0.9)
    )
    assert skm.recall_score(labels, scores >= threshold) >= 0.9
    higher = np.unique(scores[scores > threshold])[:1]
    assert not len(higher) or skm.recall_score(labels, scores >= higher[0]) < 0.9


def test_min_cost_threshold_beats_other_thresholds_on_cost(scored):
    labels, scores = scored
    rule = ThresholdConfig(rule="min_cost", cost_false_positive=1, cost_false_negative=50)

    def cost(threshold: float) -> float:
        m = classification_metrics(labels, scores, threshold)["confusion"]
        return m["fp"] * 1 + m["fn"] * 50

    chosen = choose_threshold(labels, scores, rule)
    for other in (0.3, 0.5, 0.7, choose_threshold(labels, scores, ThresholdConfig())):
        assert cost(chosen) <= cost(other)


def test_report_and_metrics_written_next_to_the_run(pipeline_run):
    config, result = pipeline_run
    folder = Path(result.run_uri, "evaluate", Path(result.metrics["model_uri"]).parent.name)
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in (
        "roc_auc",
        "pr_auc",
        "log_loss",
        "brier",
        "precision",
        "recall",
        "f1",
        "confusion",
        "calibration",
        "importance",
        "threshold",
    ):
        assert key in metrics
    assert set(metrics["slices"]) == set(config.evaluate.slices)
    assert sum(v["rows"] for v in metrics["slices"]["channel"].values()) == metrics["rows"]
    assert "pos" in metrics["slices"]["channel"]
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert "<td>merchant_category</td>" in html and 'src="http' not in html


def _isolated_run(config, result, tmp_path: Path, name: str, **overrides):
    """A copy of the shared storage (registry included) with a new run reusing the features,
    so gate tests move aliases without touching what other test modules see."""
    storage = tmp_path / "storage"
    shutil.copytree(config.storage, storage)
    destination = storage / "runs" / name
    shutil.copytree(Path(result.run_uri) / "features", destination / "features")
    shutil.copytree(Path(result.run_uri) / "ingest", destination / "ingest")
    return make_config("d", storage, **overrides), str(destination)


def test_gate_keeps_production_when_the_candidate_is_worse(pipeline_run, tmp_path):
    config, result = pipeline_run
    weak, run_uri = _isolated_run(
        config,
        result,
        tmp_path,
        "weak",
        **{"train.num_boost_round": 2, "train.params": {"max_depth": 1, "eta": 0.01}},
    )
    storage, registry_uri = Storage(), join(weak.storage, "registry")
    before = registry.get_alias(storage, registry_uri, config.name, "production")["version"]
    outcome = finish_run(weak, run_uri, quiet=True)
    assert not outcome.promoted
    assert "does not beat" in outcome.gate["reason"]
    assert registry.get_alias(storage, registry_uri, config.name, "production")["version"] == before
    candidate = registry.get_alias(storage, registry_uri, config.name, "candidate")
    assert candidate["version"] == outcome.version != before


def test_gate_promotes_a_winner_and_rollback_restores(pipeline_run, tmp_path):
    config, result = pipeline_run
    lenient, run_uri = _isolated_run(
        config, result, tmp_path, "lenient", **{"evaluate.promotion.min_improvement": -1.0}
    )
    storage, registry_uri = Storage(), join(lenient.storage, "registry")
    before = registry.get_alias(storage, registry_uri, config.name, "production")["version"]
    outcome = finish_run(lenient, run_uri, quiet=True)
    assert outcome.promoted and "beats" in outcome.gate["reason"]
    assert registry.get_alias(storage, registry_uri, config.name, "production")["version"] == (
        outcome.version
    )
    registry.rollback(storage, registry_uri, config.name)
    assert registry.get_alias(storage, registry_uri, config.name, "production")["version"] == before


def test_scores_are_calibrated_probabilities_and_the_report_shows_both_curves(pipeline_run):
    """scale_pos_weight pushes raw scores far above the base rate; calibration on valid brings
    them back: the test-split Brier score drops and the mean score is near the base rate."""
    config, result = pipeline_run
    metrics = result.metrics
    calibration = metrics["calibration"]
    assert calibration["method"] == config.evaluate.calibration == "isotonic"
    assert calibration["brier_after"] < calibration["brier_before"]
    after = calibration["after"]
    assert max(after["mean_score"]) <= 1.0 and min(after["mean_score"]) >= 0.0
    base_rate = metrics["positives"] / metrics["rows"]
    assert np.mean(after["mean_score"]) < 3 * base_rate + 0.01
    assert np.mean(calibration["before"]["mean_score"]) > np.mean(after["mean_score"])
    folder = Path(result.run_uri, "evaluate", Path(metrics["model_uri"]).parent.name)
    html = (folder / "report.html").read_text()
    assert "Calibration before and after" in html and "Split: <b>time</b>" in html
    assert json.loads((folder / "calibration.json").read_text())["method"] == "isotonic"
