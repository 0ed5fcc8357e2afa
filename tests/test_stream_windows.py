"""A model trained with window features: streamed events get the batch window values
bitwise, and tumbling windows of quiet customers close on the wall clock."""

from __future__ import annotations

import json
import time

import pytest

from jobs.pipeline import run_pipeline
from jobs.stream_keys import StreamKeys
from jobs.stream_worker import StreamWorker
from tests.conftest import make_config
from tests.test_stream import as_record, assert_replay_matches_batch, fact_rows, send, streamed

pytestmark = pytest.mark.slow

WINDOWS = {
    "txn_count_1h": {"agg": "count", "seconds": 3600},
    "amount_mean_24h": {"agg": "mean", "seconds": 86400},
    "amount_sum_day": {"agg": "sum", "seconds": 86400, "kind": "tumbling"},
}


@pytest.fixture(scope="module")
def windows_run(ray_session, sample_data, tmp_path_factory):
    base = make_config(sample_data, tmp_path_factory.mktemp("windows"))
    config = make_config(
        sample_data, tmp_path_factory.mktemp("windows"),
        **{
            "features.windows": WINDOWS,
            "features.numeric": [*base.features.numeric, *WINDOWS],
            "stream": {"redis_url": "redis://127.0.0.1:1/0"},  # set per test below
            "train.num_boost_round": 40,
        },
    )  # fmt: skip
    return config, run_pipeline(config, quiet=True)


def test_window_features_stream_as_they_were_trained(windows_run, redis_server):
    config, result = windows_run
    config = streamed(config, redis_server.url, emit_features=True, partitions=3)
    assert_replay_matches_batch(config, result, redis_server.client())


def test_idle_tumbling_windows_close_on_the_wall_clock(windows_run, redis_server):
    config, result = windows_run
    config = streamed(config, redis_server.url, window_idle_s=0.5, partitions=1)
    client, keys = redis_server.client(), StreamKeys.of(config)
    rows = fact_rows(config, result.run_uri).slice(0, 40).to_pylist()
    send(client, keys, [as_record(row) for row in rows])
    worker = StreamWorker(config, [0], client=client)
    worker.poll()
    assert client.xlen(keys.windows) == 0  # every customer's day is still open
    time.sleep(1.2)
    worker.poll()
    closed = [json.loads(f[b"window"]) for _, f in client.xrange(keys.windows)]
    customers = {row["customer_id"] for row in rows}
    assert {c["entity"] for c in closed} == customers
    assert {c["window"] for c in closed} == {"amount_sum_day"}
    assert sum(c["count"] for c in closed) == len(rows)  # each event in exactly one window
    assert client.zcard(keys.open_windows(0)) == 0
    worker.poll()
    assert client.xlen(keys.windows) == len(closed)  # closed once
