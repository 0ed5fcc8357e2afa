"""The stream side against a real redis-server and the pipeline's real bundle.

Every count here is made from what the test itself sent, not from the workers' counters."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from jobs.feature_state import FeatureState, bootstrap
from jobs.featurespec import feature_matrix, transform
from jobs.registry import load_bundle
from jobs.scoring import model_scores
from jobs.storage import Storage, join
from jobs.stream import consumer_lag, flush_scores, scores_folder
from jobs.stream_config import StreamConfig
from jobs.stream_keys import StreamKeys
from jobs.stream_worker import LostLease, StreamWorker

pytestmark = pytest.mark.slow


def streamed(config, redis_url: str, **stream):
    """The config with its own stream (a prefix of its own: the storage is shared)."""
    values = {"redis_url": redis_url, "partitions": 2, "batch_size": 64, "block_ms": 20}
    values["prefix"] = f"rayline:test-{uuid.uuid4().hex[:8]}"
    return config.model_copy(update={"stream": StreamConfig(**(values | stream))})


def fact_rows(config, run_uri: str) -> pa.Table:
    """The run's accepted fact rows, in (event time, key) order: the order a stream delivers."""
    table = Storage(config.s3).read_table_dir(join(run_uri, "ingest", "transactions"))
    return table.sort_by([("timestamp", "ascending"), ("transaction_id", "ascending")])


def as_record(row: dict) -> dict:
    columns = ("transaction_id", "customer_id", "merchant_id", "amount", "currency", "channel")
    record = {name: row[name] for name in columns}
    record["timestamp"] = row["timestamp"].isoformat()
    return record


def send(client, keys: StreamKeys, records: list[dict], entity="customer_id") -> list[str]:
    """XADDs each record to its entity's partition; returns 'stream/id' of every message."""
    pipe = client.pipeline(transaction=False)
    streams = []
    for record in records:
        stream = keys.events(keys.partition(record.get(entity)))
        streams.append(stream)
        pipe.xadd(stream, {"record": json.dumps(record), "enqueued_at": time.time()})
    ids = pipe.execute()
    return [f"{s}/{i.decode()}" for s, i in zip(streams, ids, strict=True)]


def drain(worker: StreamWorker, client, keys, group="rayline", timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while consumer_lag(client, keys, group) > 0:
        assert time.monotonic() < deadline, "the worker did not drain the stream"
        worker.poll()


def scores(client, keys) -> list[dict]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in client.xrange(keys.scores)
    ]


def assert_replay_matches_batch(config, result, client) -> list[dict]:
    """Bootstraps the state with the run's events outside its test split, streams the test
    split through a worker and checks features (bitwise) and scores against the batch."""
    keys, storage = StreamKeys.of(config), Storage(config.s3)
    bundle = load_bundle(storage, join(config.storage, "registry"), config.name, result.version)
    test_raw = storage.read_table_dir(join(result.run_uri, "features", "test_raw"))
    rows = fact_rows(config, result.run_uri)
    in_test = pc.is_in(rows.column("transaction_id"), value_set=test_raw.column("transaction_id"))
    history = rows.filter(pc.invert(in_test))
    state = FeatureState(client, keys.prefix, bundle.spec.features, config.stream)
    assert bootstrap(state, history, bundle.spec.features, "transaction_id") == history.num_rows

    sent = send(client, keys, [as_record(row) for row in rows.filter(in_test).to_pylist()])
    worker = StreamWorker(config, list(range(config.stream.partitions)), client=client)
    assert worker.scorer.bundle.version == result.version
    drain(worker, client, keys)

    out = scores(client, keys)
    assert sorted(f"{e['stream']}/{e['id']}" for e in out) == sorted(sent)  # each once
    batch = feature_matrix(transform(test_raw, bundle.spec), bundle.spec.feature_names)
    expected = model_scores(bundle.booster, batch, bundle.spec.task, bundle.calibration)
    position = {key: i for i, key in enumerate(test_raw.column("transaction_id").to_pylist())}
    online = np.array([json.loads(e["features"]) for e in out], dtype=np.float32)
    order = [position[e["key"]] for e in out]
    np.testing.assert_array_equal(online, batch[order])  # bitwise, history included
    np.testing.assert_array_equal([float(e["score"]) for e in out], expected[order])
    assert {e["version"] for e in out} == {str(result.version)}
    assert client.xlen(keys.dead) == 0 and client.xlen(keys.late) == 0
    return out


def test_replayed_test_split_gets_the_batch_features_and_scores_exactly(pipeline_run, redis_server):
    config, result = pipeline_run
    config = streamed(config, redis_server.url, emit_features=True)
    client, storage = redis_server.client(), Storage(config.s3)
    out = assert_replay_matches_batch(config, result, client)
    files = flush_scores(config, client, storage)
    stored = storage.read_table_dir(scores_folder(config))
    assert files >= 1 and sorted(stored.column("message_id").to_pylist()) == sorted(
        e["id"] for e in out
    )
    assert flush_scores(config, client, storage) == 0  # nothing new: no duplicate file
    client.delete(StreamKeys.of(config).sink_cursor)  # a crash after a write, before the cursor
    flush_scores(config, client, storage)
    again = storage.read_table_dir(scores_folder(config))
    assert sorted(again.column("message_id").to_pylist()) == sorted(e["id"] for e in out)


def test_malformed_and_poison_events_end_in_dead_letters(pipeline_run, redis_server):
    config, result = pipeline_run
    config = streamed(config, redis_server.url, max_deliveries=3, partitions=1)
    client, keys = redis_server.client(), StreamKeys.of(config)
    rows = fact_rows(config, result.run_uri).slice(0, 20).to_pylist()
    good = [as_record(row) for row in rows]
    worker = StreamWorker(config, [0], client=client)
    stream = keys.events(0)
    client.xadd(stream, {"record": b"{not json"})
    client.xadd(stream, {"record": json.dumps([1, 2])})
    client.xadd(stream, {"other": "field"})
    client.xadd(stream, {"record": json.dumps({**good[0], "amount": "12.5"})})  # a string
    client.xadd(stream, {"record": json.dumps({**good[1], "channel": "fax"})})  # a rule
    client.xadd(stream, {"record": "[" * 20_000 + "]" * 20_000})  # nested too deeply
    client.xadd(stream, {"record": json.dumps({**good[4], "channel": "x" * 70_000})})
    future = {**good[5], "timestamp": "2999-01-01T00:00:00"}
    client.xadd(stream, {"record": json.dumps(future)})
    client.xadd(stream, {"record": b'{"transaction_id": "\xff\xfe"}'})  # not UTF-8
    # A poison key: its stored state is corrupt, so every attempt to score it fails.
    poison = {**good[2], "customer_id": "C-POISON"}
    client.set(f"{keys.prefix}:state:C-POISON", "[corrupt")
    client.xadd(stream, {"record": json.dumps(poison)})
    send(client, keys, good[6:])
    send(client, keys, good[6:8])  # sent twice: same transaction ids, new messages
    for _ in range(10):
        worker.poll()
        if consumer_lag(client, keys, "rayline") == 0:
            break
    assert consumer_lag(client, keys, "rayline") == 0, "the poison event blocked the stream"
    dead = {
        fields[b"reason"].decode(): fields[b"record"].decode()
        for _, fields in client.xrange(keys.dead)
    }
    assert dead["record: not a JSON object"] == "[1, 2]"  # the record as it came
    reasons = sorted(dead)
    assert len(reasons) == 10, "\n".join(reasons)
    assert "record: JSON nested too deeply" in reasons
    assert "record: larger than 65536 bytes" in reasons
    assert "timestamp: more than 86400 s in the future" in reasons
    assert sum(r.startswith("record: not JSON") for r in reasons) == 2
    assert "record: not a JSON object" in reasons and "no `record` field" in reasons
    assert "amount: Input should be a valid number" in reasons
    assert "channel: not allowed" in reasons
    assert any(r.startswith("failed 3 times: JSONDecodeError") for r in reasons)
    assert len(scores(client, keys)) == len(good) - 6  # every good neighbour, once
    assert int(client.hget(keys.stats, "duplicates")) == 2


def test_a_batch_with_invalid_records_commits_at_once(pipeline_run, redis_server):
    """Invalid records are set aside within the batch; the batch is not retried event by
    event (which is for events that raise)."""
    config, result = pipeline_run
    config = streamed(config, redis_server.url, partitions=1, batch_size=100)
    client, keys = redis_server.client(), StreamKeys.of(config)
    records = [as_record(row) for row in fact_rows(config, result.run_uri).slice(0, 50).to_pylist()]
    records[10]["amount"] = "not a number"
    records[20]["channel"] = "fax"
    send(client, keys, records)
    worker = StreamWorker(config, [0], client=client)
    outcome = worker.poll()
    assert (outcome.scored, outcome.dead) == (48, 2) and worker.last_error == ""


def test_a_message_that_keeps_killing_its_worker_is_dead_lettered(pipeline_run, redis_server):
    """Crashes leave a message pending; each new owner re-reads it; past max_deliveries it
    goes to the dead letters instead of taking the next worker down too."""
    config, result = pipeline_run
    config = streamed(config, redis_server.url, max_deliveries=2, partitions=1)
    client, keys = redis_server.client(), StreamKeys.of(config)
    worker = StreamWorker(config, [0], client=client)
    record = as_record(fact_rows(config, result.run_uri).slice(0, 1).to_pylist()[0])
    send(client, keys, [record])
    # Two owners read it and died before acknowledging: the first as new, the next from the
    # pending list; the third delivery is this worker's.
    client.xreadgroup("rayline", "worker", {keys.events(0): ">"}, count=10)
    client.xreadgroup("rayline", "worker", {keys.events(0): "0"}, count=10)
    worker.poll()
    ((_, fields),) = client.xrange(keys.dead)
    assert fields[b"reason"].decode().startswith("delivered 3 times")
    assert consumer_lag(client, keys, "rayline") == 0 and client.xlen(keys.scores) == 0


def test_a_broker_restart_loses_nothing(pipeline_run, redis_server):
    config, result = pipeline_run
    config = streamed(config, redis_server.url)
    client, keys = redis_server.client(), StreamKeys.of(config)
    records = [
        as_record(row) for row in fact_rows(config, result.run_uri).slice(0, 600).to_pylist()
    ]
    worker = StreamWorker(config, [0, 1], client=redis_server.client())
    first = send(client, keys, records[:300])
    thread = threading.Thread(target=worker.run, kwargs={"seconds": 60}, daemon=True)
    thread.start()
    time.sleep(0.3)
    redis_server.restart()  # SIGTERM: redis writes its append-only file and exits
    client = redis_server.client()
    second = send(client, keys, records[300:])
    deadline = time.monotonic() + 60
    while consumer_lag(client, keys, "rayline") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    worker.stop()
    thread.join(30)
    out = scores(client, keys)
    assert sorted(f"{e['stream']}/{e['id']}" for e in out) == sorted(first + second)
    assert worker.errors >= 1  # it did see the broker go away


def test_late_events_go_to_their_stream_and_state_expires(pipeline_run, redis_server):
    config, result = pipeline_run
    config = streamed(config, redis_server.url, allowed_lateness_s=60, state_ttl_s=3600)
    client, keys = redis_server.client(), StreamKeys.of(config)
    base = as_record(fact_rows(config, result.run_uri).slice(0, 1).to_pylist()[0])
    moment = datetime.fromisoformat(base["timestamp"])
    stamps = [moment.replace(second=30), moment.replace(second=0), moment.replace(minute=0)]
    records = [
        {**base, "transaction_id": f"late-{i}", "customer_id": "C-LATE", "timestamp": s.isoformat()}
        for i, s in enumerate([*stamps, stamps[0]])
    ]
    records[2]["timestamp"] = moment.replace(second=30).timestamp() - 3600  # an hour early
    records[2]["timestamp"] = datetime.fromtimestamp(records[2]["timestamp"]).isoformat()
    send(client, keys, records)
    worker = StreamWorker(config, [0, 1], client=client)
    drain(worker, client, keys)
    late = [json.loads(f[b"record"])["transaction_id"] for _, f in client.xrange(keys.late)]
    assert late == ["late-2"]  # 30 s out of order is allowed; an hour is not
    assert {e["key"] for e in scores(client, keys)} == {"late-0", "late-1", "late-3"}
    assert int(client.hget(keys.stats, "late")) == 1
    ttl = client.ttl(f"{keys.prefix}:state:C-LATE")
    assert 3500 < ttl <= 3600


def test_two_workers_never_own_one_partition(pipeline_run, redis_server):
    """A second `rayline stream run` on the same config (or a stalled owner's successor)
    waits for the partition's lease instead of reading it too."""
    config, result = pipeline_run
    config = streamed(config, redis_server.url)
    client, keys = redis_server.client(), StreamKeys.of(config)
    rows = fact_rows(config, result.run_uri).slice(0, 300).to_pylist()
    sent = send(client, keys, [as_record(row) for row in rows])
    first = StreamWorker(config, [0, 1], client=client)
    second = StreamWorker(config, [0, 1], client=redis_server.client())
    first.poll()
    assert second.poll().scored == 0 and second.leased == set()
    drain(first, client, keys)
    assert second.totals.scored == 0
    first._release({0, 1})  # what `run` does when it stops
    send(client, keys, [as_record(row) for row in rows[:10]])
    drain(second, client, keys)
    assert second.leased == {0, 1} and second.totals.duplicates == 10  # scored: same keys
    assert len(scores(client, keys)) == len(sent)


def test_a_worker_that_lost_its_lease_writes_nothing(pipeline_run, redis_server):
    """An owner that stalled past its lease finds out at commit: the transaction does not
    run, and the events stay pending for the partition's new owner."""
    config, result = pipeline_run
    config = streamed(config, redis_server.url, partitions=1)
    client, keys = redis_server.client(), StreamKeys.of(config)
    worker = StreamWorker(config, [0], client=client)
    worker._renew_leases()
    rows = fact_rows(config, result.run_uri).slice(0, 20).to_pylist()
    send(client, keys, [as_record(row) for row in rows])
    events = worker._read()
    client.set(keys.lease(0), "another-worker")  # the lease expired and was taken
    with pytest.raises(LostLease):
        worker.handle(events)
    assert client.xlen(keys.scores) == 0 and client.get(keys.stats) is None
    assert client.xpending(keys.events(0), "rayline")["pending"] == len(rows)


def test_events_that_were_in_a_crashing_batch_are_not_dead_lettered(pipeline_run, redis_server):
    """Two owners died with the whole batch pending: the next one takes the pending events
    one at a time, so only an event that itself keeps failing could use up its deliveries."""
    config, result = pipeline_run
    config = streamed(config, redis_server.url, partitions=1, max_deliveries=3)
    client, keys = redis_server.client(), StreamKeys.of(config)
    rows = fact_rows(config, result.run_uri).slice(0, 30).to_pylist()
    worker = StreamWorker(config, [0], client=client)
    send(client, keys, [as_record(row) for row in rows])
    client.xreadgroup("rayline", "worker", {keys.events(0): ">"}, count=100)
    client.xreadgroup("rayline", "worker", {keys.events(0): "0"}, count=100)
    drain(worker, client, keys)
    assert client.xlen(keys.dead) == 0 and client.xlen(keys.scores) == len(rows)


def test_messages_left_idle_by_another_consumer_are_claimed(pipeline_run, redis_server):
    """A consumer under another name (an older deployment, a hand-run script) read events
    and went away: after `claim_idle_ms` the partition's owner takes them over."""
    config, result = pipeline_run
    config = streamed(config, redis_server.url, partitions=1, claim_idle_ms=200)
    client, keys = redis_server.client(), StreamKeys.of(config)
    worker = StreamWorker(config, [0], client=client)
    rows = fact_rows(config, result.run_uri).slice(0, 25).to_pylist()
    sent = send(client, keys, [as_record(row) for row in rows])
    client.xreadgroup("rayline", "someone-else", {keys.events(0): ">"}, count=100)
    worker.poll()
    assert client.xlen(keys.scores) == 0  # not idle long enough yet
    time.sleep(0.3)
    drain(worker, client, keys)
    assert sorted(f"{e['stream']}/{e['id']}" for e in scores(client, keys)) == sorted(sent)
