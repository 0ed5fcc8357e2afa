"""Stream workers as Ray actors: scaling on lag within bounds, and a worker process killed
mid-batch losing no event and duplicating none."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import requests

from jobs.stream import run_stream
from jobs.stream_keys import StreamKeys
from tests.conftest import free_port
from tests.test_stream import as_record, fact_rows, scores, send, streamed

pytestmark = pytest.mark.slow


def worker_pids(client, keys: StreamKeys) -> list[int]:
    """Workers that beat in the last 2 s and still run (their heartbeat names the PID)."""
    alive = []
    for pid, beat in client.hgetall(keys.workers).items():
        if time.time() - json.loads(beat)["at"] < 2.0 and os.path.exists(f"/proc/{int(pid)}"):
            alive.append(int(pid))
    return alive


def test_workers_scale_with_lag_and_survive_a_killed_worker(pipeline_run, redis_server):
    config, result = pipeline_run
    config = streamed(
        config, redis_server.url, partitions=4, batch_size=40, min_workers=1, max_workers=2,
        scale_up_lag=2000, scale_down_lag=50, scale_down_after_s=1.0, metrics_port=free_port(),
    )  # fmt: skip
    client, keys = redis_server.client(), StreamKeys.of(config)
    rows = fact_rows(config, result.run_uri).slice(0, 20000).to_pylist()
    sent = send(client, keys, [as_record(row) for row in rows])
    outcome = {}
    thread = threading.Thread(
        target=lambda: outcome.update(result=run_stream(config, until_idle=4, quiet=True)),
        daemon=True,
    )
    thread.start()
    deadline = time.monotonic() + 120
    while len(worker_pids(client, keys)) < 2:  # the lag (20,000) is far above scale_up_lag
        assert time.monotonic() < deadline, "no second worker"
        time.sleep(0.5)
    while client.xlen(keys.scores) < 1500:
        assert time.monotonic() < deadline, "nothing scored"
        time.sleep(0.2)
    port = config.stream.metrics_port  # the stream's Prometheus endpoint, while it runs
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'rayline_stream_consumer_lag{group="rayline",partition="0"}' in metrics
    assert "rayline_stream_scored_total" in metrics
    os.kill(worker_pids(client, keys)[0], signal.SIGKILL)  # mid-batch: batches follow one another
    thread.join(timeout=240)
    assert not thread.is_alive(), "the stream did not finish"
    streamed_result = outcome["result"]
    out = scores(client, keys)
    ids = [f"{e['stream']}/{e['id']}" for e in out]
    assert len(ids) == len(set(ids)), "a redelivered event was scored twice"
    assert sorted(ids) == sorted(sent), "an event was lost"
    events = " · ".join(streamed_result.scale_events)
    assert "up to 2" in events and "lost" in events and "down to 1" in events, events
    assert streamed_result.workers_peak == 2
    assert all(0 < s < 60 for s in streamed_result.worker_start_s)
