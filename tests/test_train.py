"""Training: plans, class imbalance, bad input, Ray Train on 2 CPUs, and resume after a kill."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from jobs.boosting import checkpoint_uri, features_digest, imbalance_plan
from jobs.errors import ConfigError, TrainingError
from jobs.registry import load_bundle
from jobs.storage import Storage, join
from jobs.train import choose_plan, train_model
from tests.conftest import make_config


def copy_features(run_uri: str, destination: Path) -> str:
    """A new run that reuses an existing run's features (train starts from scratch there)."""
    shutil.copytree(Path(run_uri) / "features", destination / "features")
    return str(destination)


def test_pipeline_model_beats_the_base_rate(pipeline_run):
    _, result = pipeline_run
    base_rate = result.metrics["positives"] / result.metrics["rows"]
    assert result.metrics["roc_auc"] > 0.75
    assert result.metrics["pr_auc"] > 5 * base_rate


def test_bundle_records_plan_and_measured_class_ratio(pipeline_run):
    config, result = pipeline_run
    bundle = load_bundle(Storage(), join(config.storage, "registry"), config.name, result.version)
    training = bundle.lineage["training"]
    report = Storage().read_json(join(result.run_uri, "features", "_report.json"))
    negatives = report["rows"]["train"] - report["positives"]["train"]
    assert training["plan"] == "single" and "forced" in training["reason"]
    assert training["imbalance"]["strategy"] == "scale_pos_weight"
    assert training["imbalance"]["scale_pos_weight"] == pytest.approx(
        negatives / report["positives"]["train"], rel=1e-3
    )
    assert training["params"]["scale_pos_weight"] == training["imbalance"]["scale_pos_weight"]
    assert bundle.lineage["config_digest"] == config.digest()


def test_auto_plan_picks_single_task_on_one_node():
    config = make_config("d", "s", **{"train.plan": "auto"})
    plan, reason = choose_plan(config.train, rows=50_000, cluster_cpus=2, nodes=1)
    assert plan == "single" and "one node" in reason
    plan, _ = choose_plan(config.train, rows=10_000_000, cluster_cpus=64, nodes=4)
    assert plan == "distributed"


def test_unknown_hyperparameter_fails_before_any_work(pipeline_run, tmp_path):
    config, result = pipeline_run
    with pytest.raises(ConfigError, match=r"train\.params.*max_dept"):
        make_config("d", config.storage, **{"train.params": {"max_dept": 3}})
    with pytest.raises(ConfigError, match=r"train\.params\.max_depth"):
        make_config("d", config.storage, **{"train.params": {"max_depth": -3}})
    with pytest.raises(ConfigError, match=r"tune\.space\.eta\.loguniform"):
        make_config("d", config.storage, **{"tune.space": {"eta": {"loguniform": [0.3, -1]}}})


def test_single_class_and_empty_split_are_named(pipeline_run, tmp_path):
    config, result = pipeline_run
    with pytest.raises(TrainingError, match="single class"):
        imbalance_plan(0, 1000, config.train)
    run_uri = copy_features(result.run_uri, tmp_path)
    report_uri = join(run_uri, "features", "_report.json")
    report = Storage().read_json(report_uri)
    report["rows"]["train"] = 0
    Storage().write_json(report_uri, report)
    with pytest.raises(TrainingError, match="empty training split"):
        train_model(config, run_uri)


def test_missing_checkpoint_is_an_error_not_a_silent_restart(pipeline_run, tmp_path):
    config, result = pipeline_run
    run_uri = copy_features(result.run_uri, tmp_path)
    folder = checkpoint_uri(run_uri, config.train, config.seed, features_digest(Storage(), run_uri))
    gone = join(folder, "round-000020.ubj")
    Storage().write_json(join(folder, "latest.json"), {"round": 20, "uri": gone})
    with pytest.raises(TrainingError, match="round-000020.ubj"):
        train_model(config, run_uri)


@pytest.mark.slow
def test_rebuilt_features_never_resume_old_checkpoints_and_models_are_never_overwritten(
    pipeline_run, tmp_path
):
    """Checkpoints are keyed by the features' fingerprint as well as the training config, and
    every training writes its own model folder (a registered bundle's lineage stays true)."""
    config, result = pipeline_run
    small = make_config(
        "d", config.storage, **{"train.num_boost_round": 40, "train.checkpoint_every": 10}
    )
    run_uri = copy_features(result.run_uri, tmp_path)
    first = train_model(small, run_uri)
    first_bytes = Path(first.model_uri).read_bytes()
    again = train_model(small, run_uri)  # same features: resumes from its checkpoints
    assert again.resumed_from_round > 0
    report_uri = join(run_uri, "features", "_report.json")
    report = Storage().read_json(report_uri)
    report["fingerprints"]["train"]["content_hash"] = "0" * 16  # as a features re-run would
    Storage().write_json(report_uri, report)
    rebuilt = train_model(small, run_uri)
    assert rebuilt.resumed_from_round == 0
    assert rebuilt.checkpoint_uri != first.checkpoint_uri
    assert len({first.model_uri, again.model_uri, rebuilt.model_uri}) == 3
    assert Path(first.model_uri).read_bytes() == first_bytes
    latest = Storage().read_json(join(run_uri, "train", "_result.json"))
    assert latest["model_uri"] == rebuilt.model_uri


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_train_plan_on_two_cpus_does_not_starve(pipeline_run, tmp_path, monkeypatch):
    """2 workers x 1 CPU hold every CPU of the 2-CPU Ray; reads must not wait behind them."""
    config, result = pipeline_run
    distributed = make_config(
        "d",
        config.storage,
        **{
            "train.plan": "distributed",
            "train.num_workers": 2,
            "train.cpus_per_worker": 1,
            "train.num_boost_round": 60,
            "train.checkpoint_every": 20,
        },
    )
    copy_features(result.run_uri, tmp_path / "run")
    # A relative run folder, as `make demo`'s config gives: the workers run in their own
    # folder, so the plan must hand them absolute paths.
    monkeypatch.chdir(tmp_path)
    trained = train_model(distributed, "run")
    assert trained.plan == "distributed"
    assert Path(trained.model_uri).exists()
    assert trained.valid_aucpr > 0.1


def _kill_when_checkpointed(run_uri: str, min_round: int, killed: list) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not killed:
        pointer = next((Path(run_uri) / "train" / "checkpoints").glob("*/latest.json"), None)
        if pointer is not None:
            try:
                round_done = Storage().read_json(str(pointer))["round"]
            except (ValueError, OSError):
                round_done = 0
            if round_done >= min_round:
                for process in psutil.process_iter(["cmdline"]):
                    if "ray::_train_task" in " ".join(process.info["cmdline"] or []):
                        process.send_signal(signal.SIGKILL)
                        killed.append((process.pid, round_done))
                        return
        time.sleep(0.005)


@pytest.mark.slow
def test_killed_training_worker_resumes_from_checkpoint(pipeline_run, tmp_path):
    config, result = pipeline_run
    long_run = make_config(
        "d",
        config.storage,
        **{
            "train.plan": "single",
            "train.num_boost_round": 800,
            "train.early_stopping_rounds": 800,
            "train.checkpoint_every": 20,
            "train.max_failures": 2,
            # No row or column sampling: a resumed run must rebuild the same model.
            "train.params": {
                "max_depth": 6,
                "eta": 0.02,
                "subsample": 1.0,
                "colsample_bytree": 1.0,
            },
        },
    )
    reference = train_model(long_run, copy_features(result.run_uri, tmp_path / "reference"))
    run_uri = copy_features(result.run_uri, tmp_path / "killed")
    killed: list = []
    watcher = threading.Thread(target=_kill_when_checkpointed, args=(run_uri, 40, killed))
    watcher.start()
    resumed = train_model(long_run, run_uri)
    watcher.join()
    assert killed, "the training worker was never killed"
    assert resumed.resumed_from_round >= 40
    assert resumed.rounds == reference.rounds == 800
    assert resumed.valid_aucpr == pytest.approx(reference.valid_aucpr, abs=0.005)


def test_new_training_configuration_in_the_same_run_starts_from_round_zero(pipeline_run, tmp_path):
    """Checkpoints belong to one configuration: tuning's retrain must not resume the old model."""
    config, result = pipeline_run
    run_uri = copy_features(result.run_uri, tmp_path)
    first = train_model(config, run_uri)
    retuned = make_config("d", config.storage, **{"train.params": {"max_depth": 3, "eta": 0.2}})
    second = train_model(retuned, run_uri)
    assert first.resumed_from_round == second.resumed_from_round == 0
    assert second.params["max_depth"] == 3
