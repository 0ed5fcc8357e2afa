"""The production HTTP API over real HTTP: auth, limits, a bad-input corpus, canary and shadow
traffic, an alias moving under steady load, overload, and a replica killed under load.

One app is deployed for the module on a private copy of the registry with three versions:
1 (the pipeline's), 2 (same model, threshold 0: every label is 1, so responses tell versions
apart) and 3 (same as 1). Two replicas, so killing one leaves the other serving.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from jobs.aliases import get_alias, set_alias
from jobs.registry import load_bundle, publish
from jobs.storage import Storage
from tests import test_serving
from tests.bad_requests import corpus
from tests.conftest import ADMIN_HEADERS, PREDICT_HEADERS, free_port

pytestmark = pytest.mark.slow
TIMEOUT = 60
JSON = {"Content-Type": "application/json"}
raw_records = test_serving.raw_records  # the same 40 clean records, as fixtures
records = test_serving.records


@pytest.fixture(scope="module")
def bundle(pipeline_run):
    config, _ = pipeline_run
    return load_bundle(Storage(config.s3), str(Path(config.storage, "registry")), config.name)


@pytest.fixture(scope="module")
def api(pipeline_run, tmp_path_factory):
    """(config, url, storage, registry_uri) of the app serving a private registry copy."""
    from ray import serve

    from serving.app import deploy

    config, result = pipeline_run
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(Path(config.storage, "registry"), root / "registry")
    storage, registry_uri = Storage(config.s3), str(root / "registry")
    first = load_bundle(storage, registry_uri, config.name, 1)
    calibration = {"calibration.json": json.dumps(first.calibration).encode()}
    for threshold in (0.0, first.threshold):  # versions 2 and 3
        publish(
            storage, registry_uri, config.name, result.run_uri, threshold, result.metrics,
            first.lineage, extra_files=calibration,
        )  # fmt: skip
    serve_cfg = config.serve.model_copy(
        update={
            "port": free_port(),
            "refresh_s": 0.5,
            "replica_cpus": 0.5,
            "max_ongoing_requests": 16,
            "max_queued_requests": 16,
            "autoscaling": config.serve.autoscaling.model_copy(
                update={"min_replicas": 2, "max_replicas": 2}
            ),
        }
    )
    served = config.model_copy(update={"storage": str(root), "serve": serve_cfg})
    try:
        url = deploy(served)
        yield served, url, storage, registry_uri
    finally:
        serve.shutdown()


def post(url: str, body, headers=PREDICT_HEADERS, path="/predict", raw: bool = False):
    data = body if raw else json.dumps(body)
    return requests.post(f"{url}{path}", data=data, headers={**JSON, **headers}, timeout=TIMEOUT)


def replica_log(field: str, value) -> list[dict]:
    """JSON log records of the app's replicas (Ray's session log folder) where field == value."""
    import ray

    folder = Path(ray._private.worker._global_node.get_logs_dir_path(), "serve")
    found = []
    for path in folder.glob("replica_rayline_Ingress_*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{field}"' in line:
                record = json.loads(line)
                if record.get(field) == value:
                    found.append(record)
    return found


def versions_of(responses) -> Counter:
    return Counter(r.json()["version"] for r in responses if r.status_code == 200)


# ---------------------------------------------------------------- auth and request ids


def test_auth_scopes_and_probes(api, records):
    _, url, _, _ = api
    body = {"records": records[:1]}
    assert post(url, body, headers={}).status_code == 401
    unknown = post(url, body, headers={"Authorization": "Bearer not-a-real-token"})
    assert unknown.status_code == 401 and "invalid" in unknown.text
    assert unknown.headers["WWW-Authenticate"] == "Bearer"
    assert post(url, body, headers={"Authorization": "Basic abc"}).status_code == 401
    assert post(url, body, headers=ADMIN_HEADERS).status_code == 200  # admin,predict token
    forbidden = requests.post(
        f"{url}/admin/models/fraud/reload", headers=PREDICT_HEADERS, timeout=TIMEOUT
    )
    assert forbidden.status_code == 403 and "admin" in forbidden.text
    assert requests.get(f"{url}/models", timeout=TIMEOUT).status_code == 401
    for probe in ("/healthz", "/readyz"):
        assert requests.get(f"{url}{probe}", timeout=TIMEOUT).status_code == 200


def test_request_id_is_echoed_or_made(api, records):
    _, url, _, _ = api
    given = post(
        url, {"records": records[:1]}, headers={**PREDICT_HEADERS, "X-Request-Id": "abc-1"}
    )
    assert given.headers["X-Request-Id"] == "abc-1" == given.json()["request_id"]
    made = post(url, {"records": records[:1]})
    assert made.headers["X-Request-Id"] == made.json()["request_id"]
    assert made.json()["request_id"] != post(url, {"records": records[:1]}).json()["request_id"]
    refused = post(url, {"records": []}, headers={**PREDICT_HEADERS, "X-Request-Id": "bad-1"})
    assert refused.status_code == 422 and refused.json()["request_id"] == "bad-1"
    wait_for(lambda: replica_log("rayline_request_id", "abc-1"))  # JSON lines, with the id
    [logged] = replica_log("rayline_request_id", "abc-1")
    assert (logged["model"], logged["version"], logged["status"]) == ("fraud", 1, 200)
    assert PREDICT_HEADERS["Authorization"].split()[1] not in json.dumps(logged)


@pytest.mark.parametrize("count", [65, 1000])
def test_requests_larger_than_a_batch_answer_in_order(api, records, count):
    _, url, _, _ = api
    many = (records * (count // len(records) + 1))[:count]
    response = post(url, {"records": many})
    assert response.status_code == 200, response.text
    scores = [p["score"] for p in response.json()["predictions"]]
    assert len(scores) == count
    repeat = min(len(records), count - len(records))
    assert scores[:repeat] == scores[len(records) : len(records) + repeat]


# ---------------------------------------------------------------- the bad-input corpus


def test_bad_input_corpus_is_all_4xx_naming_the_problem(api, records):
    _, url, _, _ = api
    cases = corpus(records[0])
    assert len(cases) >= 40
    failures = []
    for case, body, headers, status, text in cases:
        data = body if isinstance(body, bytes) else json.dumps(body)
        response = requests.post(
            f"{url}/predict",
            data=data,
            headers={**JSON, **PREDICT_HEADERS, **headers},
            timeout=TIMEOUT,
        )
        if response.status_code != status or text.lower() not in response.text.lower():
            failures.append((case, response.status_code, response.text[:200]))
        assert response.status_code < 500, (case, response.text[:500])
    assert not failures, failures
    assert post(url, {"records": records[:1]}).status_code == 200  # still serving
    many_bad = post(url, {"records": [{}] * 1000})  # the answer stays small
    assert many_bad.status_code == 422 and len(many_bad.json()["detail"]) == 21
    assert len(many_bad.content) < 10_000


def test_named_model_route_schema_and_reload(api, records):
    _, url, _, _ = api
    named = post(url, {"records": records[:2]}, path="/models/fraud/predict")
    assert named.status_code == 200 and len(named.json()["predictions"]) == 2
    assert named.json()["predictions"] == post(url, {"records": records[:2]}).json()["predictions"]
    schema = requests.get(f"{url}/schema", timeout=TIMEOUT).json()
    assert schema["properties"]["records"]["maxItems"] == 1000
    reloaded = requests.post(
        f"{url}/admin/models/fraud/reload", headers=ADMIN_HEADERS, timeout=TIMEOUT
    )
    assert reloaded.status_code == 200 and reloaded.json()["model"]["version"] == 1


def test_other_bad_routes_are_4xx(api, records):
    _, url, _, _ = api
    assert post(url, {"records": records[:1]}, path="/models/nope/predict").status_code == 404
    assert requests.get(f"{url}/predict", timeout=TIMEOUT).status_code == 405
    chunked = requests.post(  # no Content-Length: the stream itself is counted
        f"{url}/predict",
        data=(b" " * 65536 for _ in range(40)),
        headers={**JSON, **PREDICT_HEADERS},
        timeout=TIMEOUT,
    )
    assert chunked.status_code == 413
    unicode_ok = post(url, {"records": [{**records[0], "merchant_id": "商店-🛒"}]})
    assert unicode_ok.status_code == 200, unicode_ok.text


# ---------------------------------------------------------------- traffic: canary, shadow


def put_traffic(url: str, body: dict, headers=ADMIN_HEADERS):
    return requests.put(
        f"{url}/admin/models/fraud/traffic", json=body, headers=headers, timeout=TIMEOUT
    )


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_canary_split_and_shadow_change_at_run_time(api, records):
    _, url, _, _ = api
    body = {"records": records[:1]}
    assert put_traffic(url, {"canary": {"ref": "99", "weight": 0.5}}).status_code == 409
    assert put_traffic(url, {"canary": {"ref": "2", "weight": 1.5}}).status_code == 422
    assert (
        put_traffic(url, {"canary": {"ref": "2", "weight": 0.5}}, PREDICT_HEADERS).status_code
        == 403
    )
    changed = put_traffic(url, {"canary": {"ref": "2", "weight": 0.5}})
    assert changed.status_code == 200, changed.text
    assert changed.json()["model"]["traffic"] == {"1": 0.5, "2": 0.5}
    wait_for(lambda: len(versions_of([post(url, body) for _ in range(20)])) == 2)
    seen = versions_of([post(url, body) for _ in range(200)])
    assert set(seen) == {1, 2} and 50 < seen[2] < 150, seen

    assert put_traffic(url, {"canary": None, "shadow": "3"}).status_code == 200
    wait_for(lambda: versions_of([post(url, body) for _ in range(20)]) == Counter({1: 20}))
    models = requests.get(f"{url}/models", headers=PREDICT_HEADERS, timeout=TIMEOUT).json()
    assert models["models"][0]["shadow"] == 3
    assert models["models"][0]["traffic"] == {"1": 1.0}
    shadowed = post(url, body, headers={**PREDICT_HEADERS, "X-Request-Id": "shadowed-1"})
    assert shadowed.json()["version"] == 1
    wait_for(lambda: replica_log("rayline_request_id", "shadowed-1") and any(
        r.get("shadow_version") == 3 for r in replica_log("rayline_request_id", "shadowed-1")
    ))  # fmt: skip
    assert put_traffic(url, {}).status_code == 200


# ---------------------------------------------------------------- rollout under load


class SteadyLoad:
    """Threads posting one record at a time until stopped; every response is kept."""

    def __init__(self, url: str, body: dict, threads: int = 4):
        self.url, self.body, self.stop = url, body, threading.Event()
        self.responses: list[tuple[float, int, int | None]] = []
        self.errors: list[str] = []
        self.workers = [threading.Thread(target=self.run) for _ in range(threads)]

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                response = post(self.url, self.body)
                version = response.json().get("version") if response.status_code == 200 else None
                self.responses.append((time.monotonic(), response.status_code, version))
            except requests.RequestException as error:
                self.errors.append(str(error))

    def __enter__(self) -> SteadyLoad:
        for worker in self.workers:
            worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join()


def test_alias_move_under_load_drops_nothing(api, records):
    config, url, storage, registry_uri = api
    with SteadyLoad(url, {"records": records[:1]}) as load:
        time.sleep(2)
        set_alias(storage, registry_uri, config.name, "production", 3, reason="test rollout")
        wait_for(lambda: any(v == 3 for _, _, v in load.responses[-8:]))
        time.sleep(1)
    statuses = Counter(status for _, status, _ in load.responses)
    assert statuses == Counter({200: len(load.responses)}) and not load.errors, statuses
    versions = [v for _, _, v in load.responses]
    assert versions[0] == 1 and versions[-1] == 3
    assert len(load.responses) > 50

    rolled = requests.post(
        f"{url}/admin/models/fraud/rollback", headers=ADMIN_HEADERS, timeout=TIMEOUT
    )
    assert rolled.status_code == 200, rolled.text
    assert get_alias(storage, registry_uri, config.name, "production")["version"] == 1
    wait_for(lambda: post(url, {"records": records[:1]}).json()["version"] == 1)


def test_serve_status_shows_replicas_versions_and_traffic(api):
    import os
    import subprocess
    import sys

    import ray

    _, url, _, _ = api
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "RAYLINE_TOKEN": PREDICT_HEADERS["Authorization"].split()[1],
        "COLUMNS": "200",
    }
    command = [sys.executable, "-m", "jobs.cli", "serve", "status", "--config"]
    done = subprocess.run(
        [*command, "configs/fraud.yaml", "--url", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Ingress" in done.stdout and "HEALTHY" in done.stdout
    assert "2 running" in done.stdout
    assert "production" in done.stdout and "v1 100%" in done.stdout
    env.pop("RAYLINE_TOKEN")
    refused = subprocess.run(
        [*command, "configs/fraud.yaml", "--url", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "RAYLINE_TOKEN" in refused.stderr


def test_a_version_that_cannot_load_is_never_served(api, records, pipeline_run):
    """A corrupt version behind the alias: replicas keep serving, and so does a fresh one."""
    import ray

    config, url, storage, registry_uri = api
    _, result = pipeline_run
    first = load_bundle(storage, registry_uri, config.name, 1)
    version = publish(
        storage, registry_uri, config.name, result.run_uri, first.threshold, result.metrics,
        first.lineage,
    )  # fmt: skip
    model_file = Path(registry_uri, config.name, "versions", f"{version:06d}", "model.ubj")
    model_file.write_bytes(model_file.read_bytes()[:-10] + b"corrupted!")
    shadow = put_traffic(url, {"shadow": str(version)})
    assert shadow.status_code == 409 and "checksum" in shadow.text
    assert put_traffic(url, {"shadow": "²"}).status_code == 422
    assert put_traffic(url, {"shadow": "../aliases/production"}).status_code == 422
    body = {"records": records[:1]}
    with SteadyLoad(url, body, threads=2) as load:
        set_alias(storage, registry_uri, config.name, "production", version, reason="broken")
        time.sleep(3)
        replica = next(
            actor
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith("SERVE_REPLICA::rayline#Ingress")
        )
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]))
        time.sleep(10)
    assert {v for _, status, v in load.responses if status == 200} == {1}
    failed = sum(1 for _, status, _ in load.responses if status != 200) + len(load.errors)
    assert failed / max(len(load.responses), 1) < 0.01
    models = requests.get(f"{url}/models", headers=PREDICT_HEADERS, timeout=TIMEOUT).json()
    [model] = models["models"]
    assert (model["version"], model["alias_version"]) == (1, version)
    assert any("checksum" in problem for problem in model["problems"])
    wait_for(lambda: versions_of([post(url, body) for _ in range(10)]) == Counter({1: 10}), 60)
    set_alias(storage, registry_uri, config.name, "production", 1, reason="test cleanup")


# ---------------------------------------------------------------- overload and failures


def test_overload_answers_503_with_retry_after(api, records):
    _, url, _, _ = api
    body = {"records": (records * 25)[:1000]}
    with ThreadPoolExecutor(max_workers=120) as pool:
        responses = list(pool.map(lambda _: post(url, body), range(240)))
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] > 0, statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers.get("Retry-After") == "1"
    assert post(url, {"records": records[:1]}).status_code == 200


def test_killing_a_replica_under_load_fails_under_one_percent(api, records):
    import ray

    _, url, _, _ = api
    replicas = [
        name
        for name in ray.util.list_named_actors(all_namespaces=True)
        if name["name"].startswith("SERVE_REPLICA::rayline#Ingress")
    ]
    assert len(replicas) == 2, replicas
    with SteadyLoad(url, {"records": records[:1]}) as load:
        time.sleep(3)
        victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
        ray.kill(victim, no_restart=False)
        time.sleep(12)
    failed = sum(1 for _, status, _ in load.responses if status != 200) + len(load.errors)
    total = len(load.responses) + len(load.errors)
    assert total > 200
    assert failed / total < 0.01, (failed, total)
    wait_for(lambda: requests.get(f"{url}/readyz", timeout=TIMEOUT).status_code == 200, 60)
