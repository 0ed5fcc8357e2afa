"""Preemption drills on a real multi-node Ray cluster on this machine.

Training runs on two spot nodes (the distributed plan, one worker on each). Mid-fit:
- with notice: a spot node is drained with Ray's preemption reason and a deadline, as a cloud
  notice relayed by `jobs.spot_watcher` would, a replacement spot node joins (as the autoscaler
  would launch one), and once the deadline has passed the node's `ray start` gets SIGTERM;
- without notice: a spot node and all its processes are SIGKILLed, and a replacement joins.

Both jobs must complete; the bundle's lineage must count the interruption and the rounds
trained twice; with notice the run must resume from the just-in-time checkpoint (a round the
periodic checkpoints never write), and the final model must match an uninterrupted run of the
same config within a stated tolerance.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from jobs.registry import load_bundle
from jobs.storage import Storage, join
from tests.conftest import ROOT, make_config
from tests.multinode import VENV_BIN, LocalCluster

pytestmark = pytest.mark.slow

MARKET, INSTANCE = "ray.io/market-type", "rayline.io/instance-type"
SPOT = {MARKET: "spot", INSTANCE: "m6i.2xlarge"}
EXCLUDES = ["data/", "artifacts/", ".venv/", "*.parquet", ".git/"]
CHECKPOINT_EVERY = 6000  # the notice comes before the first one: only a just-in-time save helps
ROUNDS = 15000  # small rounds, many of them: the fit outlasts the notice by far
NOTICE_S = 8
# Resuming from a checkpoint continues the same boosting on the same shards: the metrics of
# an interrupted run may differ from an uninterrupted one only through the row sampling
# (subsample) restarting its random stream, which this tolerance covers.
TOLERANCE = {"roc_auc": 0.01, "pr_auc": 0.03}


@pytest.fixture(scope="module")
def cluster():
    # Ray Train polls the GCS for drains every 5 s by default; a 1 s poll leaves the short
    # notice of this drill (and GCP's 30 s) more room.
    # The GCS declares a silent node dead after about 3 s instead of about 30 s, so a node
    # lost without notice is known before the run's cost report is written.
    cluster = LocalCluster(
        extra_env={
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
    )
    try:
        cluster.start_head(cpus=0, labels={MARKET: "on-demand", INSTANCE: "m6i.xlarge"})
        cluster.add_worker("spot-a", 1, SPOT)
        cluster.add_worker("spot-b", 1, {**SPOT, INSTANCE: "c6i.2xlarge"})
        yield cluster
    finally:
        leftovers = cluster.shutdown()
        assert not leftovers, f"processes outlived their `ray start --block`: {leftovers}"


@pytest.fixture(scope="module")
def drill_config(sample_data, tmp_path_factory):
    """Long enough to interrupt: many small rounds, no early stop before the end."""
    folder = tmp_path_factory.mktemp("drill")
    config = make_config(
        sample_data,
        folder / "artifacts",
        **{
            "train.plan": "distributed",
            "train.num_workers": 2,
            "train.label_selector": {MARKET: "spot"},
            "train.num_boost_round": ROUNDS,
            "train.early_stopping_rounds": ROUNDS,
            "train.checkpoint_every": CHECKPOINT_EVERY,
            "train.params": {"eta": 0.01, "max_depth": 4},
            "evaluate.promotion.min_improvement": -1.0,  # every drill's model is published
        },
    )
    path = folder / "drill.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return config, path


def submit(cluster: LocalCluster, path: Path) -> subprocess.Popen:
    command = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard,
        "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
        "--", "python", "-m", "jobs.pipeline", "--config", str(path),
    ]  # fmt: skip
    return subprocess.Popen(command, env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)  # fmt: skip


def finished(job: subprocess.Popen) -> str:
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output
    return output


def wait_for_checkpoint(config, started: float, timeout: float = 400) -> None:
    """Until the running fit has written its first periodic checkpoint."""
    root = Path(config.storage, "runs")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for found in root.glob("*/train/ray_train/*/checkpoint_*"):
            if found.stat().st_mtime >= started:
                return
        time.sleep(0.5)
    pytest.fail("training never wrote a checkpoint")


def wait_for_training(cluster: LocalCluster, job: subprocess.Popen, workers: int) -> None:
    """Until the fit's workers are alive, then a few seconds of boosting."""
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if job.poll() is not None:
            pytest.fail(f"the job ended before training started:\n{job.stdout.read()}")
        alive = [a for a in cluster.list_actors("RayTrainWorker") if a["state"] == "ALIVE"]
        if len(alive) == workers:
            time.sleep(5)
            return
        time.sleep(0.5)
    job.kill()
    pytest.fail(f"training never started:\n{job.communicate()[0]}")


def latest_bundle(config):
    storage = Storage(config.s3)
    registry = join(config.storage, "registry")
    return load_bundle(storage, registry, config.name), storage, registry


def _training(bundle) -> dict:
    return bundle.lineage["training"]


def test_uninterrupted_reference_run(cluster, drill_config):
    config, path = drill_config
    finished(submit(cluster, path))
    bundle, *_ = latest_bundle(config)
    training = _training(bundle)
    assert training["interruptions"]["interruptions"] == 0
    assert training["interruptions"]["rounds_redone"] == 0
    assert training["rounds"] == ROUNDS


def _matches_reference(config, bundle) -> None:
    _, storage, registry = latest_bundle(config)
    reference = load_bundle(storage, registry, config.name, 1)
    assert _training(bundle)["rounds"] == _training(reference)["rounds"]
    for metric, tolerance in TOLERANCE.items():
        assert abs(bundle.metrics[metric] - reference.metrics[metric]) <= tolerance, metric


def test_preemption_with_notice_resumes_from_the_just_in_time_checkpoint(cluster, drill_config):
    config, path = drill_config
    job = submit(cluster, path)
    wait_for_training(cluster, job, config.train.num_workers)
    node_id = cluster.nodes["spot-a"].node_id
    drained = subprocess.run(
        [str(VENV_BIN / "ray"), "drain-node", "--address", cluster.address, "--node-id", node_id,
         "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot drill",
         "--deadline-remaining-seconds", str(NOTICE_S)],
        env=cluster.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert drained.returncode == 0, drained.stdout + drained.stderr
    noticed = time.monotonic()
    # The replacement the autoscaler would launch joins while the notice runs.
    replacement = threading.Thread(target=cluster.add_worker, args=("spot-c", 1, SPOT))
    replacement.start()
    time.sleep(max(0.0, NOTICE_S - (time.monotonic() - noticed)))
    # At the deadline the cloud shuts the machine down: SIGTERM, then power off.
    cluster.stop_node("spot-a", wait_s=5)
    replacement.join(timeout=300)
    finished(job)

    bundle, *_ = latest_bundle(config)
    training = _training(bundle)
    ledger = training["interruptions"]
    assert ledger["interruptions"] >= 1, ledger
    assert ledger["just_in_time_checkpoints"] >= 1, ledger
    # Resumed from the round the notice was seen at: there was no periodic checkpoint yet.
    assert 0 < ledger["resumed_from"][0] == ledger["just_in_time_rounds"][0], ledger
    assert ledger["resumed_from"][0] < CHECKPOINT_EVERY, ledger
    assert 0 <= ledger["rounds_redone"] < CHECKPOINT_EVERY, ledger
    _matches_reference(config, bundle)
    cost = bundle.lineage["cost"]
    assert cost["interruptions"].get("preempted_with_notice") == 1, cost


def test_preemption_without_notice_resumes_from_the_last_checkpoint(cluster, drill_config):
    config, path = drill_config
    started = time.time()
    job = submit(cluster, path)
    wait_for_checkpoint(config, started)
    cluster.stop_node("spot-b", sig=9)  # the machine is gone: every process of the node
    cluster.add_worker("spot-d", 1, {**SPOT, INSTANCE: "m5.2xlarge"})
    finished(job)

    bundle, *_ = latest_bundle(config)
    ledger = _training(bundle)["interruptions"]
    assert ledger["interruptions"] >= 1, ledger
    assert ledger["just_in_time_checkpoints"] == 0, ledger
    assert all(r % CHECKPOINT_EVERY == 0 for r in ledger["resumed_from"]), ledger
    assert ledger["rounds_redone"] >= 0
    _matches_reference(config, bundle)
    cost = bundle.lineage["cost"]
    assert cost["interruptions"].get("lost_without_notice") == 1, cost
