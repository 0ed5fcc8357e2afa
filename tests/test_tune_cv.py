"""Cross-validation and Ray Tune: results, spreads, ASHA, and resuming an interrupted search."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.cv import cross_validate
from jobs.errors import TrainingError
from jobs.tune import search_space, tune_model
from tests.conftest import ROOT, make_config

SMALL_TUNE = {
    "tune.num_samples": 4,
    "tune.num_boost_round": 30,
    "tune.grace_period": 5,
    "tune.max_concurrent": 2,
}


def test_stratified_cv_reports_mean_and_spread(pipeline_run):
    config, result = pipeline_run
    cv = cross_validate(config, result.run_uri, folds=3)
    assert [fold["fold"] for fold in cv.per_fold] == [0, 1, 2]
    base_rate = result.metrics["positives"] / result.metrics["rows"]
    assert cv.mean["pr_auc"] > 3 * base_rate
    assert 0 < cv.std["pr_auc"] < cv.mean["pr_auc"]
    assert Path(cv.results_uri).exists()


def test_unknown_tune_parameter_is_named():
    config = make_config("d", "s", **{"tune.space": {"max_dept": {"randint": [2, 4]}}})
    with pytest.raises(TrainingError, match="max_dept"):
        search_space(config.tune)


@pytest.mark.slow
def test_tune_with_asha_finds_params_inside_the_space(pipeline_run):
    config, result = pipeline_run
    tuning = make_config("d", config.storage, **SMALL_TUNE)
    tuned = tune_model(tuning, result.run_uri, restore=False)
    assert tuned.trials == 4
    assert 3 <= tuned.best_params["max_depth"] <= 10
    assert 0.02 <= tuned.best_params["eta"] <= 0.3
    assert tuned.best_score == max(row["best"] for row in tuned.table)
    saved = json.loads(Path(tuned.results_uri).read_text())
    assert saved["best_params"] == tuned.best_params


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_interrupted_tune_resumes_without_rerunning_finished_trials(pipeline_run, tmp_path):
    config, result = pipeline_run
    settings = {**SMALL_TUNE, "tune.num_samples": 6, "tune.max_concurrent": 1}
    tuning = make_config("d", config.storage, **settings)
    config_path = tmp_path / "tune.yaml"
    config_path.write_text(yaml.safe_dump(tuning.model_dump(mode="json")))
    run_uri = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    os.symlink(Path(result.run_uri) / "features", Path(run_uri) / "features")
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.tune", "--config", str(config_path), "--run", run_uri],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    experiment = Path(run_uri) / "tune" / "experiment"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(experiment.glob("*/result.json"))) < 2:
        time.sleep(0.5)
    finished_before = {
        path.parent.name
        for path in experiment.glob("*/result.json")
        if '"done": true' in path.read_text()
    }
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    assert finished_before, "no trial finished before the interruption"
    resumed = tune_model(tuning, run_uri, restore=True)
    assert resumed.trials == 6
    trial_dirs = {path.name for path in experiment.iterdir() if path.is_dir()}
    assert finished_before <= trial_dirs
    assert len(trial_dirs) == 6
