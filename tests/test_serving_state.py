"""Serve and batch inference on the online feature state (real redis-server, real Serve app,
real HTTP): history comes from Redis, not the bundle's snapshot; an unreachable Redis is a 503
naming the broker until it is back; batch predict with the online state scores as the endpoint.

The state is bootstrapped from the pipeline run's ingested transactions, as a stream would have
left it; `expected` recomputes each score in-process from the same Redis state.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from jobs.feature_state import FeatureState, bootstrap
from jobs.online import OnlineScorer
from jobs.predict import predict
from jobs.registry import load_bundle
from jobs.storage import Storage, join
from jobs.stream_config import StreamConfig
from jobs.stream_keys import StreamKeys
from tests import test_serving
from tests.conftest import PREDICT_HEADERS, free_port
from tests.redis_server import REDIS_SERVER, RedisServer

pytestmark = pytest.mark.slow
TIMEOUT = 60
raw_records = test_serving.raw_records  # 40 clean raw transactions (fact-source names)
records = test_serving.records


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bundle(pipeline_run):
    config, _ = pipeline_run
    return load_bundle(Storage(config.s3), join(config.storage, "registry"), config.name)


@pytest.fixture(scope="module")
def online(pipeline_run, broker, bundle):
    """(config with `stream:` and serve.online_state, FeatureState) after bootstrapping the
    run's ingested transactions into Redis."""
    config, result = pipeline_run
    serve_cfg = config.serve.model_copy(
        update={"port": free_port(), "online_state": True, "replica_cpus": 0.5}
    )
    config = config.model_copy(
        update={"stream": StreamConfig(redis_url=broker.url), "serve": serve_cfg}
    )
    state = FeatureState(
        broker.client(), StreamKeys.of(config).prefix, bundle.spec.features, config.stream
    )
    table = Storage(config.s3).read_table_dir(join(result.run_uri, "ingest", config.fact))
    assert bootstrap(state, table, bundle.spec.features, "transaction_id") == table.num_rows
    return config, state


@pytest.fixture(scope="module")
def served(online):
    from ray import serve

    from serving.app import deploy

    config, _ = online
    try:
        yield deploy(config)
    finally:
        serve.shutdown()


def reader(state: FeatureState):
    """The `state` callback as the stream scorer builds it, without advancing: every row reads
    the stored state of its entity."""

    def prior(entities, amounts, seconds, null_time, reasons):
        usable = [r is None and not t for r, t in zip(reasons, null_time, strict=True)]
        moments = [None if t else int(s) for s, t in zip(seconds, null_time, strict=True)]
        ids = [""] * len(entities)
        step = state.step(state.read(entities), entities, amounts, moments, ids, usable, False)
        return {"count": step.count, "total": step.total, "last": step.last,
                "windows": step.windows}  # fmt: skip

    return prior


def post(url: str, body: list[dict]) -> requests.Response:
    return requests.post(
        f"{url}/predict", json={"records": body}, headers=PREDICT_HEADERS, timeout=TIMEOUT
    )


def http_scores(url: str, body: list[dict]) -> np.ndarray:
    response = post(url, body)
    assert response.status_code == 200, response.text
    return np.array([p["score"] for p in response.json()["predictions"]])


def parsed(bundle, body: list[dict]) -> list[dict]:
    """The records as the endpoint hands them to its scorer (validated: timestamps parsed)."""
    from serving.app import record_model

    model = record_model(bundle.spec)
    return [model.model_validate(r).model_dump() for r in body]


def stamp(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def test_history_comes_from_the_online_state(served, online, bundle, records):
    config, state = online
    scorer = OnlineScorer(bundle)
    names = bundle.spec.feature_names
    count, gap = names.index("hist_txn_count"), names.index("hist_seconds_since_prev")
    picked = list({r["customer_id"]: r for r in records}.values())[:8]
    current = state.read([r["customer_id"] for r in picked])
    assert all(current[r["customer_id"]].last is not None for r in picked)
    # A new transaction one second after each customer's latest event in the state.
    entities = [r["customer_id"] for r in picked]
    moments = [current[e].last + 1 for e in entities]
    fresh = [
        {**r, "transaction_id": f"fresh-{i}", "timestamp": stamp(moment)}
        for i, (r, moment) in enumerate(zip(picked, moments, strict=True))
    ]
    records_in = parsed(bundle, fresh)
    calls = []  # the compiled path reads the state once per call: one pipelined round trip

    def counted(*args):
        calls.append(len(args[0]))
        return reader(state)(*args)

    matrix, reasons = scorer.features(records_in, state=counted)
    assert scorer.arrow_only is None and calls == [len(fresh)]
    assert reasons == [None] * len(fresh)
    assert (matrix[:, gap] == np.float32(math.log1p(1.0))).all()  # log1p of a 1 s gap
    counts = [current[r["customer_id"]].count for r in picked]
    assert matrix[:, count].tolist() == counts
    expected = scorer.score(records_in, state=reader(state))[0]
    first = http_scores(served, fresh)
    assert np.array_equal(first, expected)
    snapshot = scorer.score(records_in)[0]  # the bundle's frozen history

    # The state moves: each customer makes a large purchase in that same second.
    ids, big = [f"moved-{i}" for i in range(len(picked))], [5000.0] * len(picked)
    step = state.step(current, entities, big, moments, ids, [True] * len(ids), advance=True)
    pipe = state.client.pipeline(transaction=False)
    state.write(pipe, step.updated)
    pipe.execute()
    moved, _ = scorer.features(records_in, state=reader(state))
    assert (moved[:, gap] == 0).all() and moved[:, count].tolist() == [c + 1 for c in counts]
    frozen, _ = scorer.features(records_in)
    assert (frozen[:, gap] != 0).all() and (frozen[:, count] != moved[:, count]).all()
    second = http_scores(served, fresh)
    assert np.array_equal(second, scorer.score(records_in, state=reader(state))[0])
    assert not np.array_equal(second, first)  # the endpoint follows the state...
    assert np.array_equal(scorer.score(records_in)[0], snapshot)  # ...the snapshot never moves
    assert not np.array_equal(second, snapshot)


def test_unreachable_state_is_503_then_recovers(served, broker, records):
    before = http_scores(served, records[:5])
    broker.stop()
    try:
        for body in (records[:1], records[:5]):
            response = post(served, body)
            assert response.status_code == 503, response.text
            [detail] = response.json()["detail"]
            assert broker.url in detail["msg"] and "online feature state" in detail["msg"]
            assert response.headers["Retry-After"] == "1"
            assert "Traceback" not in response.text
    finally:
        broker.start()
    deadline = time.monotonic() + 20
    while (response := post(served, records[:5])).status_code != 200:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.2)
    after = np.array([p["score"] for p in response.json()["predictions"]])
    assert np.array_equal(after, before)  # the state survived the restart (append-only file)


def test_batch_predict_with_online_state_scores_as_the_endpoint(
    served, online, bundle, raw_records, tmp_path
):
    config, state = online
    # New events: one minute after the latest ingested one, a second apart.
    known = state.read(raw_records.column("cust_id").to_pylist()).values()
    latest = max(s.last for s in known if s.last is not None)
    times = [stamp(latest + 60 + i) for i in range(raw_records.num_rows)]
    raw = raw_records.set_column(
        raw_records.column_names.index("event_time"), "event_time", pa.array(times, pa.string())
    )
    folder = tmp_path / "input"
    folder.mkdir()
    pq.write_table(raw, folder / "part-0.parquet")
    result = predict(config, str(folder), str(tmp_path / "out"), online_state=True)
    assert result.rows_scored == raw.num_rows
    scored = pq.read_table(result.output_uri).to_pylist()
    by_key = {row["transaction_id"]: row["score"] for row in scored}
    body = test_serving.to_http(raw)
    batch = np.array([by_key[r["transaction_id"]] for r in body])
    http = http_scores(served, body)
    assert np.array_equal(batch, http)
    scorer, body = OnlineScorer(bundle), parsed(bundle, body)
    assert np.array_equal(http, scorer.score(body, state=reader(state))[0])
    assert not np.array_equal(http, scorer.score(body)[0])  # not the snapshot's scores


def test_online_state_needs_a_stream_section(pipeline_run, tmp_path):
    from jobs.errors import ConfigError
    from serving.app import build_app

    config, _ = pipeline_run
    config = config.model_copy(update={"stream": None})  # configs/fraud.yaml has one
    serve_cfg = config.serve.model_copy(update={"online_state": True})
    with pytest.raises(ConfigError, match=r"serve\.online_state: .*`stream:`"):
        build_app(config.model_copy(update={"serve": serve_cfg}))
    with pytest.raises(ConfigError, match="`stream:`"):
        predict(config, str(tmp_path), str(tmp_path / "out"), online_state=True)
