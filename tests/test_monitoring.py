"""Serving monitoring (serving.monitoring): what a request costs, what the background thread
turns it into, request samples in storage, log lines without secrets, and, end to end, the
series a real Prometheus scrapes from a real Ray Serve replica (and the alerts they trigger)."""

from __future__ import annotations

import json
import time
from collections import defaultdict

import numpy as np
import pytest

from jobs import drift
from jobs.serve_config import MonitoringConfig
from jobs.storage import Storage
from serving import monitoring


class Instrument:
    """Records what Monitor hands a Ray metric: (value, tags) per call."""

    def __init__(self):
        self.calls: list[tuple[float, dict]] = []

    def inc(self, value=1.0, tags=None):
        self.calls.append((value, dict(tags)))

    observe = set = inc

    def total(self, **match) -> float:
        return sum(v for v, t in self.calls if all(t.get(k) == x for k, x in match.items()))

    def count(self, **match) -> int:
        return sum(1 for _, t in self.calls if all(t.get(k) == x for k, x in match.items()))

    def last(self) -> dict:
        latest: dict = {}
        for value, tags in self.calls:
            latest[tags.get("feature", "")] = value
        return latest


class Sink:
    def __init__(self):
        names = "requests records latency batch score score_rank feature_psi score_psi"
        for name in names.split():
            setattr(self, name, Instrument())


@pytest.fixture
def reference():
    rng = np.random.default_rng(3)
    matrix = np.column_stack([rng.normal(size=20_000), rng.normal(size=20_000)])
    return drift.reference(matrix.astype(np.float32), ["stable", "shifted"], rng.random(20_000))


def make_monitor(tmp_path, reference, sink, **kwargs) -> monitoring.Monitor:
    config = MonitoringConfig(
        drift_window=kwargs.pop("drift_window", 500), sample_rate=kwargs.pop("sample_rate", 0)
    )
    return monitoring.Monitor(
        "fraud", 3, reference, config, Storage(), str(tmp_path / "samples"),
        tick_s=kwargs.pop("tick_s", 3600), psi_every_s=0, sink=sink, **kwargs,
    )  # fmt: skip


def traffic(monitor, rng, requests=50, records=4, shift=2.0):
    for index in range(requests):
        features = np.column_stack(
            [rng.normal(size=records), rng.normal(shift, 1, size=records)]
        ).astype(np.float32)
        sample = [{"amount": 1.0}] * records, [{"score": 0.5, "label": 0}] * records
        monitor.observe("/predict", 200, 0.004, features, rng.random(records), f"r{index}", *sample)
        monitor.observe_batch(records)
    monitor.observe("/predict", 500, 0.2)  # a failure: no features, no scores


def test_requests_become_counts_latencies_scores_and_psi(tmp_path, reference):
    sink = Sink()
    monitor = make_monitor(tmp_path, reference, sink)
    traffic(monitor, np.random.default_rng(0))
    assert sink.requests.calls == []  # nothing but an append on the request path
    monitor.flush()
    tags = {"model": "fraud", "version": "3", "route": "/predict"}
    assert sink.requests.total(**tags, status="200") == 50
    assert sink.requests.total(**tags, status="500") == 1
    assert sink.latency.count(**tags) == 51
    assert sink.batch.count() == 50 and sink.batch.total() == 200
    assert sink.records.total(model="fraud", version="3") == 200
    assert sink.score.count() == 200 and sink.score_rank.count() == 200
    assert all(0 <= v <= 1 for v, _ in sink.score_rank.calls)
    psi = sink.feature_psi.last()
    assert psi["shifted"] > 1.0 and psi["stable"] < 0.2
    assert monitor.psi == psi and monitor.score_psi is not None and monitor.score_psi < 0.2
    monitor.flush()  # the gauges are set again every tick, or Ray would drop them
    assert sink.feature_psi.count(feature="shifted") == 2
    monitor.close()
    monitor.close()


def test_psi_waits_for_enough_rows_and_scores_are_capped(tmp_path, reference):
    sink = Sink()
    monitor = make_monitor(tmp_path, reference, sink, min_psi_rows=100, max_scores_per_tick=50)
    traffic(monitor, np.random.default_rng(1), requests=10)  # 40 rows
    monitor.flush()
    assert monitor.psi == {} and sink.feature_psi.calls == []
    assert sink.score.count() == 40
    traffic(monitor, np.random.default_rng(2), requests=20)
    monitor.flush()
    assert set(monitor.psi) == {"stable", "shifted"}
    assert sink.score.count() == 40 + 50  # a uniform sample beyond the cap
    monitor.close()


def test_regression_and_no_reference(tmp_path, reference):
    sink = Sink()
    monitor = make_monitor(tmp_path, reference, sink, task="regression")
    traffic(monitor, np.random.default_rng(4))
    monitor.flush()
    assert sink.score.count() == 0  # values have no fixed buckets; their rank has
    assert sink.score_rank.count() == 200
    monitor.close()
    sink = Sink()
    monitor = make_monitor(tmp_path, None, sink, feature_names=["stable", "shifted"])
    traffic(monitor, np.random.default_rng(5))
    monitor.observe("/predict", 200, 0.01, np.zeros((2, 7), np.float32), np.zeros(2))  # wrong
    monitor.flush()
    assert sink.requests.total(status="200") == 51 and sink.score.count() == 202
    assert sink.feature_psi.calls == [] and sink.score_rank.calls == []
    monitor.close()


def test_sampled_requests_land_in_storage_as_jsonl(tmp_path, reference):
    sink = Sink()
    monitor = make_monitor(tmp_path, reference, sink, sample_rate=1.0)
    traffic(monitor, np.random.default_rng(6), requests=20)
    monitor.close()  # writes what is buffered
    files = list((tmp_path / "samples").rglob("*.jsonl"))
    assert len(files) == 1
    assert files[0].parent.relative_to(tmp_path / "samples").parts[:2] == (
        "model=fraud",
        "version=3",
    )
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [line["request_id"] for line in lines] == [f"r{i}" for i in range(20)]
    assert lines[0]["records"] == [{"amount": 1.0}] * 4 and lines[0]["model"] == "fraud"
    assert monitor.samples_written == 20

    none = make_monitor(tmp_path / "none", reference, Sink(), sample_rate=0.0)
    traffic(none, np.random.default_rng(6), requests=20)
    none.close()
    assert not (tmp_path / "none").exists()


def test_a_storage_failure_never_reaches_the_request(tmp_path, reference):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = MonitoringConfig(drift_window=100, sample_rate=1.0)
    monitor = monitoring.Monitor(
        "fraud", 3, reference, config, Storage(), str(blocker / "samples"), tick_s=0.05,
        sink=Sink(),
    )  # fmt: skip
    traffic(monitor, np.random.default_rng(7), requests=5)
    monitor.close()
    assert monitor.samples_written == 0 and monitor.samples_dropped == 5


def test_request_path_costs_about_a_microsecond(tmp_path, reference):
    """The hot path appends to a deque; report the measurement (-s shows it)."""
    monitor = make_monitor(tmp_path, reference, Sink(), sample_rate=0.01)
    features, scores = np.zeros((1, 2), np.float32), np.zeros(1)
    records, predictions = [{"amount": 1.0}], [{"score": 0.1, "label": 0}]
    n = 20_000
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(n):
            monitor.observe("/predict", 200, 0.004, features, scores, "id", records, predictions)
            monitor.observe_batch(1)
        best = min(best, (time.perf_counter() - started) / n)
        started = time.perf_counter()
        monitor.flush()
        flushed = (time.perf_counter() - started) / n
    print(f"\nobserve + observe_batch: {best * 1e6:.2f} us per request on the request path; "
          f"background flush: {flushed * 1e6:.1f} us per request")  # fmt: skip
    assert best < 20e-6
    monitor.close()


def test_request_log_is_one_json_line_without_secrets():
    line = monitoring.request_log(
        request_id="abc",
        model="fraud",
        status=401,
        seconds=0.002,
        token="s3cret",
        headers={"Authorization": "Bearer s3cret", "X-Api-Key": "k", "accept": "json"},
        note="bearer s3cret",
    )
    assert "\n" not in line and "s3cret" not in line and "X-Api-Key" not in line
    payload = json.loads(line)
    assert payload["request_id"] == "abc" and payload["status"] == 401
    assert payload["headers"] == {"accept": "json"} and "time" in payload


# --- end to end: a Serve replica, Ray's metrics export, a real Prometheus ----------------------

DRIVER = """
import json, os, time
import numpy as np
import ray
from ray import serve
from tests.conftest import free_port

ray.init(address=os.environ["RAYLINE_RAY_ADDRESS"], log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": free_port()})

@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Scorer:
    def __init__(self, samples: str):
        from jobs import drift
        from jobs.serve_config import MonitoringConfig
        from jobs.storage import Storage
        from serving.monitoring import Monitor
        rng = np.random.default_rng(0)
        reference = drift.reference(rng.normal(size=(20000, 2)), ["stable", "shifted"],
                                    rng.random(20000))
        config = MonitoringConfig(drift_window=200, sample_rate=0.5)
        self.monitor = Monitor("fraud", 3, reference, config, Storage(), samples,
                               tick_s=0.2, psi_every_s=0.5)
        self.rng = np.random.default_rng(1)

    def predict(self, records: int, status: int) -> int:
        started = time.perf_counter()
        features = np.column_stack([self.rng.normal(size=records),
                                    self.rng.normal(2.0, 1.0, size=records)]).astype(np.float32)
        scores = self.rng.random(records)
        if status == 200:
            self.monitor.observe_batch(records)
            self.monitor.observe("/predict", 200, time.perf_counter() - started, features, scores,
                                 "req", [{"amount": 1.0}] * records, scores.tolist())
        else:
            self.monitor.observe("/predict", status, time.perf_counter() - started)
        return status

    def reject(self) -> None:
        from serving.monitoring import count_request
        count_request("", "", "/predict", 401, 0.001)

    def drain(self) -> dict:
        self.monitor.flush(force_write=True)
        return {"psi": self.monitor.psi, "score_psi": self.monitor.score_psi,
                "samples": self.monitor.samples_written}

handle = serve.run(Scorer.bind(os.environ["SAMPLES"]), name="monitored", route_prefix=None)
for _ in range(4):  # spread over a few report intervals, so Prometheus sees rates
    results = [handle.predict.remote(5, 200) for _ in range(10)]
    results.append(handle.predict.remote(1, 500))
    assert [r.result() for r in results] == [200] * 10 + [500]
    time.sleep(1.2)
for _ in range(3):
    handle.reject.remote().result()
print(json.dumps(handle.drain.remote().result()))
"""


def _by_label(result: list[dict], label: str) -> dict[str, float]:
    values: dict[str, float] = defaultdict(float)
    for item in result:
        values[item["metric"].get(label, "")] += float(item["value"][1])
    return dict(values)


@pytest.mark.slow
def test_prometheus_scrapes_the_replica_metrics(metrics_head, prometheus, tmp_path):
    samples = tmp_path / "samples"
    driven = metrics_head.run_python(DRIVER, timeout=180, env={"SAMPLES": str(samples)})
    assert driven.returncode == 0, driven.stderr[-3000:]
    summary = json.loads(driven.stdout.strip().splitlines()[-1])
    assert summary["psi"]["shifted"] > 0.2, summary
    assert 0 < summary["samples"] <= 40 and list(samples.rglob("*.jsonl"))

    mv = 'model="fraud",version="3"'
    statuses = prometheus.wait_for(
        f"sum by (status) (ray_rayline_requests_total{{{mv}}})",
        lambda r: _by_label(r, "status") == {"200": 40.0, "500": 4.0},
    )
    assert statuses
    rejected = 'sum(ray_rayline_requests_total{model="",version="",status="401"})'
    prometheus.wait_for(rejected, lambda r: r and float(r[0]["value"][1]) == 3)
    series = prometheus.query(f"ray_rayline_requests_total{{{mv}}}")
    labels = series[0]["metric"]
    assert labels["deployment"] == "Scorer" and labels["application"] == "monitored"
    assert labels["replica"] and labels["route"] == "/predict"

    def equals(expected: float):
        return lambda r: len(r) == 1 and float(r[0]["value"][1]) == expected

    prometheus.wait_for(f"sum(ray_rayline_request_latency_seconds_count{{{mv}}})", equals(44))
    inf_bucket = f'sum(ray_rayline_request_latency_seconds_bucket{{{mv},le="+Inf"}})'
    prometheus.wait_for(inf_bucket, equals(44))
    prometheus.wait_for(f"sum(ray_rayline_records_total{{{mv}}})", equals(200))
    prometheus.wait_for(f"sum(ray_rayline_batch_records_count{{{mv}}})", equals(40))
    prometheus.wait_for(f'sum(ray_rayline_batch_records_bucket{{{mv},le="4.0"}})', equals(0))
    prometheus.wait_for(f'sum(ray_rayline_batch_records_bucket{{{mv},le="8.0"}})', equals(40))
    prometheus.wait_for(f"sum(ray_rayline_score_count{{{mv}}})", equals(200))
    prometheus.wait_for(f"sum(ray_rayline_score_rank_count{{{mv}}})", equals(200))
    psi = prometheus.wait_for(
        f"ray_rayline_feature_psi{{{mv}}}",
        lambda r: set(_by_label(r, "feature")) == {"stable", "shifted"},
    )
    values = _by_label(psi, "feature")
    assert values["shifted"] > 0.2 and values["stable"] < 0.2, values
    prometheus.wait_for(f"ray_rayline_score_psi{{{mv}}}", lambda r: len(r) == 1)

    # The alert rules read these very series: drift (and the 5xx share) go pending at once.
    prometheus.wait_for(
        'ALERTS{alertname="RaylineFeatureDrift",alertstate="pending",feature="shifted"}',
        lambda r: len(r) == 1,
    )
    prometheus.wait_for(
        'ALERTS{alertname="RaylineHighErrorRate",alertstate="pending"}',
        lambda r: len(r) == 1 and r[0]["metric"]["model"] == "fraud",
    )
    prometheus.wait_for(  # what RaylineReplicaDown reads (Serve reports health every ~10 s)
        "sum by (deployment) (max_over_time("
        'ray_serve_deployment_replica_healthy{application="monitored"}[1m]))',
        lambda r: _by_label(r, "deployment").get("Scorer") == 1,
    )
    # Gauges outlive Ray's 2-report TTL because the monitor thread refreshes them.
    time.sleep(3)
    assert len(prometheus.query(f"ray_rayline_feature_psi{{{mv}}}")) == 2
