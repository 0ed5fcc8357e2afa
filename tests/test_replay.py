"""`rayline stream replay` against a real redis-server: every record of the source arrives once,
on its entity's partition, in event-time order; the rate holds; labels follow after their
delay; a run's test split is exactly the rows the pipeline put there; bad input is one line.

Expected values come from the source files themselves (pyarrow), not from jobs.replay.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from collections import Counter
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.config import load_config
from jobs.entrypoint import run_cli
from jobs.replay import ReplayError, TokenBucket, replay, replay_command
from tests.conftest import ROOT, free_port, make_config

PARTITIONS = 4
PREFIX = "rayline:fraud"


def raw_transactions(data) -> pa.Table:
    """The source as written, read independently (hive folders add a `day` column)."""
    return pq.read_table(f"{data}/transactions")


def stream_messages(client, name: str) -> list[tuple[int, dict]]:
    """(server time in ms of the entry id, decoded fields) of every entry of a stream."""
    entries = client.xrange(name)
    return [
        (int(entry_id.split(b"-")[0]), {k.decode(): v.decode() for k, v in fields.items()})
        for entry_id, fields in entries
    ]


def config_for(sample_data, tmp_path, url: str, **overrides):
    return make_config(
        sample_data, tmp_path / "artifacts", stream={"redis_url": url, "partitions": PARTITIONS},
        **overrides,
    )  # fmt: skip


def test_every_record_arrives_once_on_its_partition_in_event_time_order(
    sample_data, tmp_path, redis_server
):
    config = config_for(sample_data, tmp_path, redis_server.url)
    result = replay(config)
    raw = raw_transactions(sample_data)
    customer_of = dict(zip(raw["txn_id"].to_pylist(), raw["cust_id"].to_pylist(), strict=True))
    time_of = dict(zip(raw["txn_id"].to_pylist(), raw["event_time"].to_pylist(), strict=True))
    client = redis_server.client()
    seen: Counter = Counter()
    for partition in range(PARTITIONS):
        messages = stream_messages(client, f"{PREFIX}:events:{partition}")
        assert result.partitions.get(partition, 0) == len(messages)
        order = []
        for _, fields in messages:
            record = json.loads(fields["record"])
            float(fields["enqueued_at"])
            key = record["transaction_id"]
            seen[key] += 1
            assert "label" not in record and "is_fraud" not in record and "amount_usd" not in record
            assert set(record) >= {"customer_id", "merchant_id", "amount", "currency", "timestamp"}
            assert record["customer_id"] == str(customer_of[key])  # standardized: text
            assert zlib.crc32(str(customer_of[key]).encode()) % PARTITIONS == partition
            expected = time_of[key].replace(" ", "T")
            assert record["timestamp"] == (None if expected == "not-a-time" else expected)
            stamp = record["timestamp"]
            order.append((stamp is None, datetime.fromisoformat(stamp) if stamp else 0, key))
        assert order == sorted(order), f"partition {partition} is not in (event time, key) order"
    assert seen == Counter(raw["txn_id"].to_pylist())  # duplicates in the source arrive twice
    assert result.events == raw.num_rows == sum(seen.values())
    assert result.labels == 0 and not client.exists(f"{PREFIX}:labels")
    not_a_time = pc.sum(pc.equal(raw["event_time"], "not-a-time")).as_py()
    assert result.invalid >= not_a_time > 0  # sent anyway: the workers dead-letter them


def test_token_bucket_holds_the_rate_on_a_fake_clock():
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    bucket = TokenBucket(100.0, 10, clock=lambda: now[0], sleep=sleep)
    for _ in range(50):
        bucket.take(4)
    assert now[0] == pytest.approx(200 / 100.0)  # 200 tokens at 100/s, starting empty
    now[0] += 60.0  # a stall saves up at most `capacity` tokens, not 6000
    before = now[0]
    for _ in range(10):
        bucket.take(4)
    assert now[0] - before == pytest.approx((40 - 10) / 100.0)
    bucket.take(25)  # more than a burst at once: waits for a burst, owes the rest
    bucket.take(1)
    assert now[0] - before == pytest.approx((40 - 10 + 10 + 16) / 100.0)


def test_the_rate_is_paced_on_the_broker_clock_too(sample_data, tmp_path, redis_server):
    config = config_for(sample_data, tmp_path, redis_server.url)
    rate, limit = 2000.0, 800
    result = replay(config, rate=rate, limit=limit)
    assert result.events == limit
    assert result.rate == pytest.approx(rate, rel=0.1)
    client = redis_server.client()
    streams = [f"{PREFIX}:events:{p}" for p in range(PARTITIONS)]
    stamps = [ms for name in streams for ms, _ in stream_messages(client, name)]
    assert len(stamps) == limit
    span = (max(stamps) - min(stamps)) / 1000
    assert 0.85 * (limit - 20) / rate <= span <= 1.6 * limit / rate  # 20: one pipeline at 2000/s
    fast = replay(config, limit=limit)  # unpaced: as fast as Redis takes them
    assert fast.rate > 3 * rate


def test_labels_follow_their_records_after_the_delay(sample_data, tmp_path, redis_server):
    config = config_for(sample_data, tmp_path, redis_server.url)
    delay, limit = 0.25, 300
    result = replay(config, rate=3000, limit=limit, with_labels=True, label_delay_s=delay)
    assert result.events == result.labels == limit
    client = redis_server.client()
    sent_at = {}
    for p in range(PARTITIONS):
        for ms, fields in stream_messages(client, f"{PREFIX}:events:{p}"):
            sent_at[json.loads(fields["record"])["transaction_id"]] = ms
    raw = raw_transactions(sample_data)
    label_of = dict(zip(raw["txn_id"].to_pylist(), raw["is_fraud"].to_pylist(), strict=True))
    labels = stream_messages(client, f"{PREFIX}:labels")
    assert len(labels) == limit
    for ms, fields in labels:
        label = json.loads(fields["record"])
        assert set(label) == {"transaction_id", "label"}
        assert label["label"] == label_of[label["transaction_id"]]
        lag = (ms - sent_at.pop(label["transaction_id"])) / 1000
        assert delay - 0.002 <= lag <= delay + 0.2, lag  # ids are in whole milliseconds
    assert not sent_at  # every record got its label


def test_a_runs_test_split_is_replayed_exactly(sample_data, tmp_path, redis_server, ray_session):
    from jobs.features import build_features
    from jobs.ingest import ingest

    config = config_for(sample_data, tmp_path, redis_server.url)
    ingested = ingest(config)
    features = build_features(config, ingested.run_uri, blocks=ingested.fact_blocks)
    test_keys = pq.read_table(f"{ingested.run_uri}/features/test_raw")["transaction_id"]
    result = replay(config, split="test")  # the latest run
    assert result.events == features.rows["test"] == len(test_keys) > 0
    client = redis_server.client()
    sent = [
        json.loads(fields["record"])["transaction_id"]
        for p in range(PARTITIONS)
        for _, fields in stream_messages(client, f"{PREFIX}:events:{p}")
    ]
    assert Counter(sent) == Counter(test_keys.to_pylist())  # each test row once, no duplicates
    clean = replay(config, run_uri=ingested.run_uri)  # the whole clean table of the run
    assert clean.events == ingested.sources["transactions"].rows_out
    assert clean.invalid == 0


def test_a_jsonl_source_with_dates_and_no_entity_goes_by_primary_key(tmp_path, redis_server):
    from jobs.sample_tables import generate_table

    made = generate_table("houses", str(tmp_path / "houses"), rows=400)
    stream = {"redis_url": redis_server.url}
    overrides = {"sources.listings.uri": str(tmp_path / "houses"), "stream": stream}
    config = load_config(ROOT / "configs" / "houses.yaml", overrides)
    result = replay(config, with_labels=True)
    text = Path(made["file"]).read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    client, prefix = redis_server.client(), "rayline:houses"
    seen = {}
    for partition in range(4):  # the default partitions
        for _, fields in stream_messages(client, f"{prefix}:events:{partition}"):
            record = json.loads(fields["record"])
            assert zlib.crc32(record["listing"].encode()) % 4 == partition
            seen[record["listing"]] = record
    assert result.events == len(seen) == len(lines) == 400
    for line in lines:
        assert seen[line["listing"]]["listed_on"] == line["listed_on"]  # a date as ISO text
        assert "price" not in seen[line["listing"]]
    prices = {json.loads(f["record"])["listing"]: json.loads(f["record"])["price"]
              for _, f in stream_messages(client, f"{prefix}:labels")}  # fmt: skip
    assert prices == {line["listing"]: line["price"] for line in lines}


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["replay", *args])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(replay_command)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def write_config(sample_data, tmp_path, url: str) -> str:
    data = yaml.safe_load((ROOT / "configs" / "fraud.yaml").read_text())
    data["storage"] = str(tmp_path / "artifacts")
    for name in ("transactions", "customers", "merchants"):
        data["sources"][name]["uri"] = f"{sample_data}/{name}"
    data["stream"] = {"redis_url": url, "partitions": PARTITIONS}
    path = tmp_path / "fraud.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_bad_input_is_one_line_and_exit_code_2(sample_data, tmp_path, monkeypatch, capsys):
    good = write_config(sample_data, tmp_path, f"redis://127.0.0.1:{free_port()}/0")  # no server
    no_time = tmp_path / "no_time.parquet"
    pq.write_table(raw_transactions(sample_data).drop_columns(["event_time", "day"]), no_time)
    cases = {
        ("--source", str(tmp_path / "missing")): str(tmp_path / "missing"),
        ("--source", str(no_time)): "'event_time'",
        ("--rate", "0"): "rate",
        ("--rate", "-5"): "rate",
        ("--split", "test"): f"{tmp_path / 'artifacts'}/runs",
        ("--limit", "5"): "redis at redis://127.0.0.1",  # nothing listens there
        ("--run", str(tmp_path / "no-run")): str(tmp_path / "no-run"),
    }
    for args, named in cases.items():
        code, out, err = cli(monkeypatch, capsys, "--config", good, *args)
        assert code == 2, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], (args, err)
        assert "Traceback" not in err
    survey = load_config(ROOT / "configs" / "survey.yaml", {"stream": {}})  # no timestamp
    with pytest.raises(ReplayError, match="features.timestamp is not set"):
        replay(survey)
    with pytest.raises(ReplayError, match="has no `stream:` section"):
        replay(make_config(sample_data, tmp_path, stream=None))
    with pytest.raises(ReplayError, match="choose one input"):
        replay(make_config(sample_data, tmp_path, stream={}), source_uri="x", generate_rows=5)


def test_python_dash_m_jobs_replay_runs_on_its_own(tmp_path, sample_data, redis_server):
    config = write_config(sample_data, tmp_path, redis_server.url)
    command = [sys.executable, "-m", "jobs.replay", "--config", config, "--generate", "500"]
    done = subprocess.run(
        [*command, "--rate", "5000", "--labels"], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env={"RAYLINE_QUIET": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert "\n" not in line and line.startswith("replayed "), line
    client = redis_server.client()
    events = sum(client.xlen(f"{PREFIX}:events:{p}") for p in range(PARTITIONS))
    assert events >= 500 and f"replayed {events:,} events + {events:,} labels" in line
    assert client.xlen(f"{PREFIX}:labels") == events
