"""Online feature state = batch point-in-time features, bitwise, history and windows alike.

The batch side is `history_point_in_time` over the whole table; the online side applies the
same events one by one in (time, key) order through `FeatureState.step`, with the state going
through Redis between chunks (encode/decode must not move a bit)."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from jobs.config import FeaturesConfig
from jobs.feature_state import EntityState, FeatureState, bootstrap
from jobs.featurespec import HISTORY, history_point_in_time
from jobs.online import stated_history
from jobs.stream_config import StreamConfig, WindowFeature

EPOCH = datetime(1970, 1, 1)
WINDOWS = {
    "count_1h": WindowFeature(agg="count", seconds=3600),
    "sum_1h": WindowFeature(agg="sum", seconds=3600),
    "mean_10m": WindowFeature(agg="mean", seconds=600),
    "sum_day": WindowFeature(agg="sum", seconds=86400, kind="tumbling"),
    "count_6h": WindowFeature(agg="count", seconds=6 * 3600, kind="tumbling"),
}


def events(rows: int = 3000, seed: int = 3) -> pa.Table:
    """Few entities, many events each: same-second ties, null and awkward amounts."""
    rng = np.random.default_rng(seed)
    start = datetime(2026, 3, 1)
    seconds = np.sort(rng.integers(0, 3 * 86400, rows))
    seconds[100:110] = seconds[100]  # a burst within one second
    amounts = rng.lognormal(3, 1.5, rows).tolist()
    for i in rng.choice(rows, 30, replace=False):
        amounts[i] = None
    amounts[5], amounts[6] = 1e-9, 1e12
    return pa.table(
        {
            "transaction_id": [f"t{i:05d}" for i in rng.permutation(rows)],
            "customer_id": [f"c{i}" for i in rng.integers(0, 25, rows)],
            "timestamp": pa.array([start + timedelta(seconds=int(s)) for s in seconds]),
            "amount_usd": pa.array(amounts, pa.float64()),
        }
    )


def features() -> FeaturesConfig:
    return FeaturesConfig(
        timestamp="timestamp",
        history={"entity": "customer_id", "amount": "amount_usd"},
        windows=WINDOWS,
        numeric=[*HISTORY, *WINDOWS],
    )


def online_values(table: pa.Table, state: FeatureState, chunk: int) -> dict[str, np.ndarray]:
    """Each event's features from the state before it, applied in (time, key) order, with
    the state written to Redis and read back between chunks."""
    order = table.sort_by([("timestamp", "ascending"), ("transaction_id", "ascending")])
    rows = order.to_pylist()
    values: dict[str, list] = {}
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        entities = [r["customer_id"] for r in part]
        seconds = [(r["timestamp"] - EPOCH) // timedelta(seconds=1) for r in part]
        amounts = [r["amount_usd"] for r in part]
        states = state.read(entities)
        step = state.step(
            states, entities, amounts, seconds, [r["transaction_id"] for r in part],
            [True] * len(part), advance=True,
        )  # fmt: skip
        pipe = state.client.pipeline()
        state.write(pipe, step.updated)
        pipe.execute()
        prior = {"count": step.count, "total": step.total, "last": step.last}
        amount = np.array([np.nan if a is None else a for a in amounts])
        with np.errstate(all="ignore"):
            found = stated_history(
                prior | {"windows": step.windows},
                amount,
                np.array(seconds),
                np.zeros(len(part), bool),
            )
        for name, column in found.items():
            values.setdefault(name, []).extend(column.tolist())
    keys = order.column("transaction_id").to_pylist()
    return {name: dict(zip(keys, column, strict=True)) for name, column in values.items()}


@pytest.mark.parametrize("chunk", [1, 97])
def test_online_state_gives_the_batch_point_in_time_features_bitwise(redis_server, chunk):
    table = events()
    spec = features()
    batch = history_point_in_time(table, spec, "transaction_id")
    state = FeatureState(redis_server.client(), "t", spec, StreamConfig(redis_url=redis_server.url))
    online = online_values(table, state, chunk)
    keys = table.column("transaction_id").to_pylist()
    for name in [*HISTORY, *WINDOWS]:
        expected = np.array(batch.column(name).to_pylist(), dtype=float)  # null -> NaN
        got = np.array([online[name][k] for k in keys], dtype=float)
        np.testing.assert_array_equal(got, expected, err_msg=name)  # NaN == NaN here
    assert np.isfinite(np.array(batch.column("count_1h").to_pylist(), float)).all()


def test_bootstrap_leaves_the_state_an_event_by_event_replay_leaves(redis_server):
    table, spec = events(500, seed=9), features()
    client = redis_server.client()
    stream = StreamConfig(redis_url=redis_server.url, state_ttl_s=600)
    replayed = FeatureState(client, "one", spec, stream)
    online_values(table, replayed, 1)
    loaded = FeatureState(client, "all", spec, stream)
    assert bootstrap(loaded, table, spec, "transaction_id") == 500
    entities = sorted(set(table.column("customer_id").to_pylist()))
    assert replayed.read(entities) == loaded.read(entities)
    assert 0 < client.ttl(loaded.key(entities[0])) <= 600


def test_state_round_trips_through_redis_exactly():
    state = EntityState(3, 0.1 + 0.2, 1_700_000_000, "s/1-0", [[1, 1e-300], [2, 5e300]], {"d": 0})
    assert EntityState.decode(state.encode()) == state
    assert EntityState.decode(state.encode().encode()) == state  # bytes, as Redis returns it
    assert EntityState.decode(None) == EntityState()
