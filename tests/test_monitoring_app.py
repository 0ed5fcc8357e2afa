"""End to end: the real rayline app on a private Ray head, real HTTP traffic, and a real
Prometheus scraping Ray's metrics endpoint for the app's series with model and version labels:
requests by status, latency, batch sizes, scores and per-feature drift (PSI)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.registry import load_bundle
from jobs.storage import Storage, join
from tests.conftest import PREDICT_TOKEN, free_port
from tests.test_serving import RAW_COLUMNS, to_http

pytestmark = pytest.mark.slow

DRIVER = """
import json, os, requests, ray
from ray import serve
from jobs.config import Config
from serving.app import LOGGING, build_app

config = Config.model_validate_json(os.environ["CONFIG"])
records = json.loads(os.environ["RECORDS"])
ray.init(address=os.environ["RAYLINE_RAY_ADDRESS"], log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": config.serve.port}, logging_config=LOGGING)
serve.run(build_app(config), name="rayline", route_prefix="/", logging_config=LOGGING)
url = f"http://127.0.0.1:{config.serve.port}"
token = {"Authorization": "Bearer " + os.environ["TOKEN"]}
statuses = []
for i in range(60):
    body = {"records": [records[(2 * i) % len(records)], records[(2 * i + 1) % len(records)]]}
    answer = requests.post(f"{url}/predict", json=body, headers=token, timeout=60)
    statuses.append(answer.status_code)
bad = {"records": [{**records[0], "currency": "XXX"}]}
statuses += [requests.post(f"{url}/predict", json=bad, headers=token, timeout=60).status_code
             for _ in range(5)]
statuses += [requests.post(f"{url}/predict", json=bad, timeout=60).status_code for _ in range(3)]
print(json.dumps(statuses))
"""


def _by(result: list[dict], label: str) -> dict[str, float]:
    values: dict[str, float] = defaultdict(float)
    for item in result:
        values[item["metric"].get(label, "")] += float(item["value"][1])
    return dict(values)


def test_prometheus_sees_the_apps_series_by_model_and_version(
    metrics_head, prometheus, pipeline_run, sample_data
):
    config, _ = pipeline_run
    bundle = load_bundle(Storage(config.s3), join(config.storage, "registry"), config.name)
    first = sorted(Path(sample_data, "transactions").rglob("*.parquet"))[0]
    records = to_http(pq.read_table(first, columns=RAW_COLUMNS).slice(0, 120))
    served = config.model_copy(
        update={"serve": config.serve.model_copy(update={"port": free_port(), "replica_cpus": 0.5})}
    )
    driven = metrics_head.run_python(
        DRIVER,
        timeout=240,
        env={
            "CONFIG": served.model_dump_json(),
            "RECORDS": json.dumps(records, default=str),
            "TOKEN": PREDICT_TOKEN,
        },
    )
    assert driven.returncode == 0, driven.stderr[-3000:]
    statuses = json.loads(driven.stdout.strip().splitlines()[-1])
    assert statuses[60:] == [422] * 5 + [401] * 3
    good = statuses.count(200)
    assert good >= 55, statuses  # a few sample rows may break a rule: 422, counted below

    def equals(expected: float):
        return lambda r: len(r) == 1 and float(r[0]["value"][1]) == expected

    def at_least(expected: float):
        return lambda r: len(r) == 1 and float(r[0]["value"][1]) >= expected

    mv = f'model="fraud",version="{bundle.version}"'
    prometheus.wait_for(
        f"sum by (status) (ray_rayline_requests_total{{{mv}}})",
        lambda r: _by(r, "status") == {"200": float(good), "422": 5.0},
    )  # a sample row that fails the request schema is refused before a version is picked:
    refused = 'sum(ray_rayline_requests_total{model="fraud",status="422"})'
    prometheus.wait_for(refused, equals(65 - good))
    prometheus.wait_for(
        'sum(ray_rayline_requests_total{model="fraud",version="",status="401"})',
        lambda r: r and float(r[0]["value"][1]) == 3,
    )
    labels = prometheus.query(f"ray_rayline_requests_total{{{mv}}}")[0]["metric"]
    assert labels["application"] == "rayline" and labels["route"] == "/predict"

    prometheus.wait_for(f"sum(ray_rayline_request_latency_seconds_count{{{mv}}})", equals(good + 5))
    prometheus.wait_for(f"sum(ray_rayline_records_total{{{mv}}})", equals(2 * good))
    prometheus.wait_for(f"sum(ray_rayline_batch_records_count{{{mv}}})", at_least(1))
    prometheus.wait_for(f"sum(ray_rayline_score_count{{{mv}}})", equals(2 * good))
    psi = prometheus.wait_for(
        f"ray_rayline_feature_psi{{{mv}}}",
        lambda r: set(_by(r, "feature")) == set(bundle.spec.feature_names),
        timeout=60,
    )
    assert all(value >= 0 for value in _by(psi, "feature").values())
