"""Feedback loop against a real redis-server: labels joined to predictions, every label
accounted for, restarts lose and duplicate nothing, live quality reaches a real Prometheus,
and a quality drop submits retraining to a real `ray start --head` with `ray job submit`."""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from sklearn.metrics import average_precision_score, precision_score, recall_score

from jobs.drift import psi, reference
from jobs.feedback import (
    GROUP,
    FeedbackJoiner,
    feedback_pairs,
    live_quality,
    run_feedback,
    score_psi,
    unmatched_stream,
)
from jobs.retrain import maybe_retrain
from jobs.stream_keys import StreamKeys
from jobs.stream_metrics import serve_metrics
from tests.conftest import free_port, make_config, pids_mentioning

VENV_BIN = Path(sys.executable).parent


def stream_config(tmp_path, redis_url: str, **feedback):
    feedback.setdefault("label_wait_s", 0)
    stream = {"redis_url": redis_url, "partitions": 2, "batch_size": 8, "feedback": feedback}
    return make_config(tmp_path / "data", tmp_path / "storage", stream=stream)


def predict(client, keys, key: str, score: float, version: int = 3, ttl: int = 3600) -> None:
    """What a stream worker leaves per scored event: the prediction and a scores entry."""
    decision = int(score >= 0.5)
    now = time.time()
    tx = client.pipeline(transaction=True)
    kept = {"score": repr(score), "label": decision, "model": "fraud", "version": version}
    tx.set(keys.prediction(key), json.dumps(kept | {"at": int(now)}), ex=ttl)
    tx.xadd(
        keys.scores,
        {"id": f"{int(now * 1000)}-0", "key": key, "entity": "c1", "score": repr(score),
         "label": decision, "model": "fraud", "version": version, "event_time": int(now),
         "scored_at": now, "enqueued_at": ""},
    )  # fmt: skip
    tx.execute()


def send_label(client, keys, record) -> None:
    payload = record if isinstance(record, str) else json.dumps(record)
    client.xadd(keys.labels, {"record": payload})


def drain(joiner: FeedbackJoiner) -> int:
    handled = 0
    while count := joiner.poll():
        handled += count
    return handled


def test_labels_join_to_predictions_and_every_label_is_accounted_for(tmp_path, redis_server):
    config = stream_config(tmp_path, redis_server.url, window=100)
    client, keys = redis_server.client(), StreamKeys.of(config)
    rng = random.Random(5)
    truth = {}
    for index in range(30):
        score = rng.random()
        predict(client, keys, f"t{index}", score)
        truth[f"t{index}"] = (score, int(rng.random() < score))
    for key, (_, label) in truth.items():
        send_label(client, keys, {"transaction_id": key, "label": label})
    for index in range(5):  # never scored (or expired)
        send_label(client, keys, {"transaction_id": f"late{index}", "label": 1})
    malformed = {
        "not json": "{oops",
        "an array": json.dumps([1, 2]),
        "no key": {"label": 1},
        "no label": {"transaction_id": "t1"},
        "label 2": {"transaction_id": "t2", "label": 2},
    }
    for record in malformed.values():
        send_label(client, keys, record)
    client.xadd(keys.labels, {"payload": "x"})  # no `record` field at all
    sent = 30 + 5 + len(malformed) + 1

    assert drain(FeedbackJoiner(config, client)) == sent

    pairs = feedback_pairs(client, keys)
    unmatched = client.xrange(unmatched_stream(keys))
    dead = client.xrange(keys.dead)
    assert len(pairs) + len(unmatched) + len(dead) == sent
    assert {p["key"]: (p["score"], p["label"]) for p in pairs} == truth
    assert [p["key"] for p in pairs] == [f"t{i}" for i in reversed(range(30))]  # newest first
    assert all(p["version"] == "3" and p["decision"] == int(p["score"] >= 0.5) for p in pairs)
    assert {f[b"key"].decode() for _, f in unmatched} == {f"late{i}" for i in range(5)}
    assert all(b"expired or never scored" in f[b"reason"] for _, f in unmatched)
    reasons = sorted(f[b"reason"].decode() for _, f in dead)
    assert any("'record' is not JSON" in r for r in reasons)
    assert any("'record' is a JSON list" in r for r in reasons)
    assert any("'record' is missing" in r for r in reasons)
    assert any("'transaction_id' (the key) is missing" in r for r in reasons)
    assert any("'label' (the label) is missing" in r for r in reasons)
    assert any("'label': 2 is not 0/1" in r for r in reasons)
    stats = {k.decode(): int(v) for k, v in client.hgetall(keys.stats).items()}
    assert stats == {"labels_joined": 30, "labels_unmatched": 5, "labels_dead": 6}
    assert client.xpending(keys.labels, GROUP)["pending"] == 0

    quality = live_quality(client, keys)
    labels = [truth[p["key"]][1] for p in pairs]
    scores = [truth[p["key"]][0] for p in pairs]
    assert quality["n"] == 30 and quality["positives"] == sum(labels)
    assert quality["pr_auc"] == pytest.approx(average_precision_score(labels, scores))
    assert live_quality(client, keys, task="multiclass")["pr_auc"] is None


def test_a_restarted_joiner_loses_and_duplicates_nothing(tmp_path, redis_server):
    config = stream_config(tmp_path, redis_server.url, window=25)
    client, keys = redis_server.client(), StreamKeys.of(config)
    for index in range(40):
        predict(client, keys, f"t{index}", index / 40)
        send_label(client, keys, {"transaction_id": f"t{index}", "label": index % 2})
    first = FeedbackJoiner(config, client, consumer="joiner")
    assert first.poll() == 8
    assert len(first.read()) == 8  # read, then "killed" before writing: 8 pending, unacked
    assert client.xpending(keys.labels, GROUP)["pending"] == 8
    redis_server.restart()  # and the broker restarts too (append-only file)

    client = redis_server.client()
    again = FeedbackJoiner(config, client, consumer="joiner")
    assert drain(again) == 32  # 8 re-read from the pending list, then 24 new

    pairs = feedback_pairs(client, keys)
    assert len(pairs) == 25  # the window
    assert [p["key"] for p in pairs] == [f"t{i}" for i in reversed(range(15, 40))]
    stats = {k.decode(): int(v) for k, v in client.hgetall(keys.stats).items()}
    assert stats == {"labels_joined": 40}
    assert client.xpending(keys.labels, GROUP)["pending"] == 0


def test_prometheus_scrapes_live_quality_psi_and_lag(tmp_path, redis_server):
    from tests.prometheus import PROMETHEUS, prometheus_server

    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    config = stream_config(tmp_path, redis_server.url, window=200)
    client, keys = redis_server.client(), StreamKeys.of(config)
    rng = np.random.default_rng(7)
    labels = (rng.random(120) < 0.3).astype(int)
    scores = np.clip(0.35 * labels + rng.random(120) * 0.7, 0, 1)
    for index, (score, label) in enumerate(zip(scores, labels, strict=True)):
        predict(client, keys, f"t{index}", float(score))
        send_label(client, keys, {"transaction_id": f"t{index}", "label": int(label)})
    drain(FeedbackJoiner(config, client))
    client.xgroup_create(keys.events(1), config.stream.group, id="$", mkstream=True)
    for index in range(7):
        client.xadd(keys.events(1), {"record": json.dumps({"n": index})})
    client.xreadgroup(config.stream.group, "w0", {keys.events(1): ">"}, count=2)
    ref = reference(rng.random((500, 1)), ["x"], rng.random(500))

    port = free_port()
    server = serve_metrics(config, client, port, addr="127.0.0.1",
                           reference_loader=lambda: ("fraud", "3", ref))  # fmt: skip
    folder = tmp_path / "prometheus"
    folder.mkdir()
    try:
        with prometheus_server([f"127.0.0.1:{port}"], folder) as prom:
            mv = 'model="fraud",version="3"'
            expected = average_precision_score(labels, scores)
            got = prom.wait_for(f"rayline_stream_live_pr_auc{{{mv}}}", lambda r: len(r) == 1)
            assert float(got[0]["value"][1]) == pytest.approx(expected, abs=1e-12)
            assert prom.value(f"rayline_stream_live_labels{{{mv}}}") == 120
            decisions = (scores >= 0.5).astype(int)
            precision = prom.value(f"rayline_stream_live_precision{{{mv}}}")
            assert precision == pytest.approx(precision_score(labels, decisions), abs=1e-12)
            recall = prom.value(f"rayline_stream_live_recall{{{mv}}}")
            assert recall == pytest.approx(recall_score(labels, decisions), abs=1e-12)
            assert prom.value(f"rayline_stream_live_positives{{{mv}}}") == labels.sum()
            assert prom.value('rayline_stream_consumer_lag{partition="1"}') == 5
            assert prom.value('rayline_stream_pending{partition="1"}') == 2
            assert prom.value('rayline_stream_consumer_lag{partition="labels"}') == 0
            assert prom.value("rayline_stream_labels_joined_total") == 120
            expected_psi = psi(ref["score"], scores[::-1])
            assert score_psi(client, keys, ref, 200, "3") == pytest.approx(expected_psi)
            count = len(scores)  # too few scores to judge drift on: no PSI, no retraining
            assert score_psi(client, keys, ref, 200, "3", minimum=count + 1) is None
            assert prom.value(f"rayline_stream_score_psi{{{mv}}}") == pytest.approx(expected_psi)
    finally:
        server.shutdown()
    assert serve_metrics(config, client) is None  # metrics_port 0: no endpoint


@pytest.fixture
def ray_head():
    """A private `ray start --head --block` with the dashboard (job API) and its own token."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),
               RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")  # fmt: skip
    ports = {
        flag: free_port()
        for flag in (
            "--port", "--dashboard-port", "--ray-client-server-port", "--metrics-export-port",
            "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port",
        )
    }  # fmt: skip
    first_worker_port = random.randrange(20_000, 29_000, 100)
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--dashboard-host", "127.0.0.1",
        "--include-dashboard", "true", "--temp-dir", str(temp_dir), "--num-cpus", "1",
        "--disable-usage-stats", "--min-worker-port", str(first_worker_port),
        "--max-worker-port", str(first_worker_port + 99),
    ]  # fmt: skip
    for flag, port in ports.items():
        command += [flag, str(port)]
    log = (temp_dir / "ray-start.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               cwd=temp_dir)  # fmt: skip
    dashboard = f"http://127.0.0.1:{ports['--dashboard-port']}"
    headers = {"Authorization": f"Bearer {token_path.read_text()}"}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, (temp_dir / "ray-start.log").read_text()
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{dashboard}/api/version", headers=headers, timeout=5).ok:
                    break
            time.sleep(0.3)
        else:
            pytest.fail(f"dashboard did not answer: {(temp_dir / 'ray-start.log').read_text()}")
        yield dashboard, headers, env
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()
        time.sleep(1)  # children exit after their parent
        for pid in pids_mentioning(str(temp_dir)):  # only this head's processes
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_quality_drop_submits_retraining_once_per_cooldown(tmp_path, redis_server, ray_head):
    dashboard, headers, env = ray_head
    config = stream_config(
        tmp_path, redis_server.url, window=50, min_labels=20, min_pr_auc=0.9, cooldown_s=600,
        retrain_address=dashboard, retrain_command="python -c \"print('retrain {config}')\"",
    )  # fmt: skip
    client, keys = redis_server.client(), StreamKeys.of(config)
    for index in range(30):  # scores unrelated to labels: PR-AUC far below 0.9
        predict(client, keys, f"t{index}", (index * 7 % 30) / 30)
        send_label(client, keys, {"transaction_id": f"t{index}", "label": index % 2})
    drain(FeedbackJoiner(config, client))
    quality = live_quality(client, keys)
    assert quality["n"] == 30 and quality["pr_auc"] < 0.9
    root = tmp_path / "checkout"
    root.mkdir()
    (root / "README").write_text("stand-in for the repo\n")

    assert maybe_retrain(config, {**quality, "n": 5}, None, client, str(root), "c.yaml") is None
    now = time.time()
    record = maybe_retrain(config, quality, None, client, str(root), "configs/x.yaml", now, env)
    assert record is not None and "error" not in record, record
    assert record["job_id"].startswith("raysubmit_") and "PR-AUC" in record["reason"]
    stored = {k.decode(): v.decode() for k, v in client.hgetall(keys.retrain).items()}
    assert stored["job_id"] == record["job_id"] and stored["submissions"] == "1"

    deadline, status = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        job = requests.get(f"{dashboard}/api/jobs/{record['job_id']}", headers=headers, timeout=10)
        status = job.json()["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.5)
    logs = requests.get(
        f"{dashboard}/api/jobs/{record['job_id']}/logs", headers=headers, timeout=10
    ).json()["logs"]
    assert status == "SUCCEEDED", logs
    assert "retrain configs/x.yaml" in logs

    # A second drop inside the cooldown submits nothing; after it, one more job goes out.
    assert maybe_retrain(config, quality, None, client, str(root), "c.yaml", now + 60, env) is None
    assert client.hget(keys.retrain, "submissions") == b"1"
    jobs = requests.get(f"{dashboard}/api/jobs/", headers=headers, timeout=10).json()
    assert len(jobs) == 1


def test_a_failed_submission_is_one_line_and_backs_off(tmp_path, redis_server, capsys):
    port = free_port()  # nothing listens there
    config = stream_config(
        tmp_path, redis_server.url, min_labels=10, max_score_psi=0.2, cooldown_s=600,
        retrain_address=f"http://127.0.0.1:{port}",
    )  # fmt: skip
    client = redis_server.client()
    quality = {"n": 100, "pr_auc": 0.99}
    record = maybe_retrain(config, quality, 0.5, client, str(tmp_path), "c.yaml", 1000.0)
    assert record is not None and "score PSI 0.500 > 0.2" in record["reason"]
    assert record["error"]
    out = capsys.readouterr().out
    assert "retraining not submitted" in out and "Traceback" not in out
    assert maybe_retrain(config, quality, 0.5, client, str(tmp_path), "c.yaml", 1010.0) is None
    assert maybe_retrain(config, quality, 0.05, client, str(tmp_path), "c.yaml", 2000.0) is None


def test_the_loop_joins_judges_and_survives_a_failed_submission(tmp_path, redis_server, capsys):
    config = stream_config(
        tmp_path, redis_server.url, min_labels=10, min_pr_auc=0.99, cooldown_s=600,
        retrain_address=f"http://127.0.0.1:{free_port()}",
    )  # fmt: skip
    client, keys = redis_server.client(), StreamKeys.of(config)
    for index in range(20):
        predict(client, keys, f"t{index}", (index * 7 % 20) / 20)
        send_label(client, keys, {"transaction_id": f"t{index}", "label": index % 2})
    rounds = iter(range(10))

    def stop() -> bool:  # the broker goes away after two batches and comes back
        done = next(rounds, None)
        if done == 2:
            redis_server.stop()
        elif done == 3:
            redis_server.start()
        return done is None

    def no_bundle():
        raise FileNotFoundError("no production alias")

    run_feedback(config, client, str(tmp_path), "c.yaml", block_ms=10, check_every_s=0,
                 reference_loader=no_bundle, stop=stop)  # fmt: skip
    pairs = feedback_pairs(client, keys)
    assert sorted(p["key"] for p in pairs) == sorted(f"t{i}" for i in range(20))
    retrain = {k.decode(): v.decode() for k, v in client.hgetall(keys.retrain).items()}
    assert "job_id" not in retrain and retrain["last_error"]
    out = capsys.readouterr().out
    assert out.count("retraining not submitted") == 1  # backs off, the loop goes on
    assert out.count("no bundle to compare scores with") == 1
    assert out.count("Redis unavailable") == 1 and "Traceback" not in out


def test_a_label_that_comes_before_its_prediction_waits_for_it(tmp_path, redis_server):
    config = stream_config(tmp_path, redis_server.url, label_wait_s=1.0)
    client, keys = redis_server.client(), StreamKeys.of(config)
    joiner = FeedbackJoiner(config, client)
    send_label(client, keys, {"transaction_id": "early", "label": 1})
    send_label(client, keys, {"transaction_id": "never", "label": 0})
    assert joiner.poll() == 2 and feedback_pairs(client, keys) == []  # both wait, unacked
    predict(client, keys, "early", 0.9)  # the event is scored after its label arrived
    deadline = time.monotonic() + 10
    while client.xpending(keys.labels, GROUP)["pending"] and time.monotonic() < deadline:
        joiner.poll(block_ms=100)
    assert [p["key"] for p in feedback_pairs(client, keys)] == ["early"]
    ((_, unmatched),) = client.xrange(unmatched_stream(keys))
    assert unmatched[b"key"] == b"never"  # waited label_wait_s, then set aside
    joined = {k.decode(): int(v) for k, v in client.hgetall(keys.stats).items()}
    assert joined == {"labels_joined": 1, "labels_unmatched": 1}
