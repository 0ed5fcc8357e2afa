"""A real multi-node Ray cluster on this machine: an on-demand head with no CPUs, two spot
workers from different instance families and one on-demand worker, each its own
`ray start --block` process with market-type and instance-type labels (as cluster/*.yaml set).

The pipeline goes in with `ray job submit --working-dir .`; training must run on spot nodes
only, the run's cost report must price each node type at its market, and the Serve replica,
deployed with `serve deploy`, must land on on-demand capacity and answer over HTTP.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
import yaml

from jobs.registry import load_bundle
from jobs.storage import Storage, join
from tests.conftest import PREDICT_HEADERS, ROOT, free_port, make_config
from tests.multinode import VENV_BIN, LocalCluster
from tests.test_serving import RAW_COLUMNS, to_http

pytestmark = pytest.mark.slow

MARKET, INSTANCE = "ray.io/market-type", "rayline.io/instance-type"
SPOT = {MARKET: "spot"}
ON_DEMAND = {MARKET: "on-demand"}
EXCLUDES = ["data/", "artifacts/", ".venv/", "*.parquet", ".git/"]


@pytest.fixture(scope="module")
def cluster():
    cluster = LocalCluster()
    try:
        cluster.start_head(cpus=0, labels={**ON_DEMAND, INSTANCE: "m6i.xlarge"})
        cluster.add_worker("spot-a", 1, {**SPOT, INSTANCE: "m6i.2xlarge"})
        cluster.add_worker("spot-b", 1, {**SPOT, INSTANCE: "c6i.2xlarge"})
        cluster.add_worker("on-demand", 1, {**ON_DEMAND, INSTANCE: "m6i.2xlarge"})
        yield cluster
    finally:
        leftovers = cluster.shutdown()
        assert not leftovers, f"processes outlived their `ray start --block`: {leftovers}"


@pytest.fixture(scope="module")
def cluster_config(cluster, sample_data, tmp_path_factory):
    """configs/fraud.yaml for this cluster: training on spot, the Serve replica on on-demand."""
    folder = tmp_path_factory.mktemp("multinode")
    config = make_config(
        sample_data,
        folder / "artifacts",
        **{
            "train.plan": "distributed",
            "train.num_workers": 2,
            "train.label_selector": SPOT,
            "serve.replica_labels": ON_DEMAND,
            "serve.replica_cpus": 0.5,
            "serve.autoscaling.min_replicas": 1,
            "serve.autoscaling.max_replicas": 1,
            "serve.port": free_port(),
        },
    )
    path = folder / "fraud-cluster.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return config, path


def _node_labels(cluster: LocalCluster) -> dict[str, dict]:
    return {node["node_id"]: node["labels"] for node in cluster.list_nodes()}


def test_pipeline_trains_on_spot_and_prices_the_run(cluster, cluster_config):
    config, path = cluster_config
    command = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard,
        "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
        "--", "python", "-m", "jobs.pipeline", "--config", str(path),
    ]  # fmt: skip
    submitted = subprocess.run(command, env=cluster.env, capture_output=True, text=True,
                               timeout=600, cwd=ROOT)  # fmt: skip
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output
    assert "run cost $" in output, output  # the cost summary is printed at the end of the run

    labels = _node_labels(cluster)
    workers = cluster.list_actors("RayTrainWorker")
    assert len(workers) == config.train.num_workers, workers
    placed = sorted(cluster.node_name(w["node_id"]) for w in workers)
    assert placed == ["spot-a", "spot-b"], placed
    assert all(labels[w["node_id"]][MARKET] == "spot" for w in workers)

    storage = Storage(config.s3)
    bundle = load_bundle(storage, join(config.storage, "registry"), config.name)
    assert bundle.lineage["training"]["plan"] == "distributed"
    cost = storage.read_json(join(bundle.lineage["run_uri"], "cost.json"))
    assert bundle.lineage["cost"]["dollars"] == pytest.approx(cost["dollars"])
    by_instance = {(row["instance"], row["market"]): row for row in cost["by_type"]}
    assert set(by_instance) == {
        ("m6i.xlarge", "on-demand"),
        ("m6i.2xlarge", "spot"),
        ("c6i.2xlarge", "spot"),
        ("m6i.2xlarge", "on-demand"),
    }
    window_h = (cost["ended_at"] - cost["started_at"]) / 3600
    for row in cost["by_type"]:
        assert row["nodes"] == 1
        assert row["node_hours"] == pytest.approx(window_h, rel=0.02)  # all lived the whole run
        assert row["dollars"] > 0
    spot = by_instance[("m6i.2xlarge", "spot")]
    on_demand = by_instance[("m6i.2xlarge", "on-demand")]
    assert spot["dollars"] < on_demand["dollars"]  # same instance, cheaper market
    assert spot["on_demand_dollars"] == pytest.approx(on_demand["dollars"], rel=0.02)
    assert 0 < cost["saving"] < 1
    assert cost["interruptions"] == {}
    assert cost["unpriced_node_hours"] == 0


def _alive_replicas(cluster: LocalCluster) -> list[dict]:
    return [
        a
        for a in cluster.list_actors()
        if a["class_name"].startswith("ServeReplica") and a["state"] == "ALIVE"
    ]


@pytest.fixture(scope="module")
def served(cluster, cluster_config, sample_data, tmp_path_factory):
    """The app deployed with `serve deploy` (after the pipeline test registered a model);
    yields its URL and one valid record."""
    config, path = cluster_config
    serve_config = {
        "proxy_location": "HeadOnly",  # one proxy: every node shares this machine's ports
        "http_options": {"host": "127.0.0.1", "port": config.serve.port},
        "applications": [
            {
                "name": "rayline",
                "route_prefix": "/",
                "import_path": "serving.app:app_builder",
                "args": {"config": str(path)},
            }
        ],
    }
    serve_path = tmp_path_factory.mktemp("serve") / "serve.yaml"
    serve_path.write_text(yaml.safe_dump(serve_config))
    deployed = subprocess.run(
        [str(VENV_BIN / "serve"), "deploy", str(serve_path), "--address", cluster.dashboard],
        env=cluster.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    url = f"http://127.0.0.1:{config.serve.port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        pytest.fail(f"the app did not become ready at {url}")
    files = sorted(Path(sample_data, "transactions").rglob("*.parquet"))
    record = to_http(pq.read_table(files[0], columns=RAW_COLUMNS).slice(0, 1))[0]
    return url, record


def predict(url: str, record: dict) -> requests.Response:
    return requests.post(
        f"{url}/predict", json={"records": [record]}, headers=PREDICT_HEADERS, timeout=30
    )


def test_serve_replica_lands_on_on_demand(cluster, served):
    url, record = served
    alive = _alive_replicas(cluster)
    assert len(alive) == 1, alive
    assert cluster.node_name(alive[0]["node_id"]) == "on-demand"
    response = predict(url, record)
    assert response.status_code == 200, response.text
    assert 0.0 <= response.json()["predictions"][0]["score"] <= 1.0


def test_serve_replica_moves_off_a_draining_node_under_load(cluster, served):
    """A preemption notice for the node holding the only replica: Serve starts a replacement
    on other on-demand capacity before the deadline and stops the old one; requests keep
    being answered throughout."""
    url, record = served
    cluster.add_worker("on-demand-2", 1, {**ON_DEMAND, INSTANCE: "m6i.2xlarge"})
    outcomes: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                outcomes.append(predict(url, record).status_code)
            except requests.RequestException:
                outcomes.append(0)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    notice_s = 60
    drained = subprocess.run(
        [str(VENV_BIN / "ray"), "drain-node", "--address", cluster.address,
         "--node-id", cluster.nodes["on-demand"].node_id,
         "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "drill",
         "--deadline-remaining-seconds", str(notice_s)],
        env=cluster.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert drained.returncode == 0, drained.stdout + drained.stderr
    noticed = time.monotonic()
    moved = None
    while time.monotonic() - noticed < notice_s:
        alive = _alive_replicas(cluster)
        if len(alive) == 1 and cluster.node_name(alive[0]["node_id"]) == "on-demand-2":
            moved = time.monotonic() - noticed
            break
        time.sleep(1)
    time.sleep(3)
    cluster.stop_node("on-demand")  # the deadline: the machine goes
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert moved is not None, f"no replica on on-demand-2 within {notice_s} s"
    failed = [code for code in outcomes if code != 200]
    assert len(outcomes) > 50
    assert len(failed) <= 0.01 * len(outcomes), (len(failed), len(outcomes), set(failed))
    assert predict(url, record).status_code == 200
