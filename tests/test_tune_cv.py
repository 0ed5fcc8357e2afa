"""Cross-validation and Ray Tune: results, spreads, ASHA (resuming: tests/test_tune_restore.py)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from jobs.cv import cross_validate
from jobs.errors import ConfigError
from jobs.tune import tune_model
from tests.conftest import make_config


@pytest.fixture(autouse=True)
def signing_key_file(tmp_path, monkeypatch):
    """Tune signs its state; tests use a key of their own, never ~/.config/rayline."""
    monkeypatch.delenv("RAYLINE_SIGNING_KEY", raising=False)
    monkeypatch.setenv("RAYLINE_SIGNING_KEY_FILE", str(tmp_path / "signing_key"))


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


def test_unknown_tune_parameter_is_named_when_the_config_is_parsed():
    with pytest.raises(ConfigError, match=r"tune\.space.*max_dept"):
        make_config("d", "s", **{"tune.space": {"max_dept": {"randint": [2, 4]}}})


@pytest.mark.slow
def test_tune_with_asha_finds_params_inside_the_space(pipeline_run):
    config, result = pipeline_run
    # The session's local Ray has no instance-type label: a dollar budget cannot bind.
    tuning = make_config("d", config.storage, **SMALL_TUNE, **{"tune.budget_usd": 0.5})
    handler = signal.getsignal(signal.SIGINT)
    with pytest.warns(UserWarning, match=r"budget_usd=0.5 cannot bind.*cannot be priced") as seen:
        tuned = tune_model(tuning, result.run_uri, restore=False)
    assert len([w for w in seen if "cannot bind" in str(w.message)]) == 1  # said once
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl+C works again after Tune
    assert tuned.trials == 4 and tuned.stopped_by == "trials"
    assert tuned.budget_usd == 0.5 and tuned.spent_usd is None
    assert "cannot be priced" in tuned.spend_note
    assert 3 <= tuned.best_params["max_depth"] <= 10
    assert 0.02 <= tuned.best_params["eta"] <= 0.3
    assert tuned.best_score == max(row["best"] for row in tuned.table)
    saved = json.loads(Path(tuned.results_uri).read_text())
    assert saved["best_params"] == tuned.best_params
