"""Features on a real local Ray: splits, point-in-time history, online/batch parity, the spec."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.features import SPLITS, build_features
from jobs.featurespec import (
    HISTORY,
    FeatureSpec,
    derive,
    history_from_state,
    history_point_in_time,
    history_state,
    transform,
)
from jobs.ingest import ingest
from tests.conftest import make_config

MAX_RATE_GAP = 0.002  # 0.2 percentage points


def read_dir(uri: str) -> pa.Table:
    files = sorted(p for p in Path(uri).rglob("*.parquet") if not p.name.startswith((".", "_")))
    assert files, f"no parquet files under {uri}"
    return pa.concat_tables([pq.read_table(f) for f in files])


def rerun_features(config, run_uri: str, target: Path):
    """build_features on a copy of `run_uri`'s ingest output (a fresh run folder)."""
    shutil.copytree(Path(run_uri, "ingest"), target / "ingest")
    return build_features(config, str(target))


@pytest.fixture(scope="module")
def run(ray_session, sample_data, tmp_path_factory):
    # A random split here (stratification, seeds); the fraud config's time split and a group
    # split have their own tests below.
    config = make_config(
        sample_data, tmp_path_factory.mktemp("features-store"), **{"split.by": "random"}
    )
    ingested = ingest(config)
    return config, ingested, build_features(config, ingested.run_uri)


@pytest.fixture(scope="module")
def clean(run) -> pa.Table:
    _, ingested, _ = run
    return read_dir(ingested.output_uri)


@pytest.fixture(scope="module")
def clean_frame(clean) -> pd.DataFrame:
    frame = clean.select(["transaction_id", "customer_id", "timestamp", "amount_usd"]).to_pandas()
    return frame.sort_values(["customer_id", "timestamp", "transaction_id"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def splits(run) -> dict[str, pa.Table]:
    _, _, result = run
    return {name: read_dir(result.split_uris[name]) for name in SPLITS}


@pytest.fixture(scope="module")
def test_raw(run) -> pa.Table:
    _, ingested, _ = run
    return read_dir(str(Path(ingested.run_uri, "features", "test_raw")))


@pytest.fixture(scope="module")
def spec(run) -> FeatureSpec:
    _, _, result = run
    return FeatureSpec.model_validate_json(Path(result.spec_uri).read_bytes())


def row_tuples(table: pa.Table, names: list[str]) -> Counter:
    columns = [table.column(n).to_numpy(zero_copy_only=False) for n in names]
    return Counter(zip(*(c.tolist() for c in columns), strict=True))


# --- splits -------------------------------------------------------------------------------------


def test_split_sizes_follow_the_config_and_cover_all_clean_rows(run, splits, clean):
    config, ingested, result = run
    assert sum(t.num_rows for t in splits.values()) == clean.num_rows
    assert clean.num_rows == ingested.sources["transactions"].rows_out
    for name in SPLITS:
        assert splits[name].num_rows == result.rows[name]
        expected = getattr(config.split, name) * clean.num_rows
        assert abs(splits[name].num_rows - expected) <= 0.01 * clean.num_rows, name


def test_splits_are_disjoint_and_together_are_exactly_the_clean_rows(
    run, splits, clean, spec, test_raw
):
    """Each clean row, engineered independently of the pipeline's split, lands in one split."""
    config, _, _ = run
    names = [*spec.feature_names, spec.features.label]
    engineered = transform(
        derive(history_point_in_time(clean, config.features, "transaction_id"), config.features),
        spec,
    )
    everything = row_tuples(engineered, names)
    per_split = {name: row_tuples(splits[name], names) for name in SPLITS}
    assert sum(per_split.values(), Counter()) == everything
    # The test split's raw rows carry ids: unique, clean, and the same rows as the test split.
    ids = test_raw.column("transaction_id").to_pylist()
    assert len(ids) == len(set(ids)) == splits["test"].num_rows
    assert set(ids) <= set(clean.column("transaction_id").to_pylist())
    assert row_tuples(transform(test_raw, spec), names) == per_split["test"]


def test_splits_are_stratified(run, splits, clean):
    label = run[0].features.label
    overall = pc.mean(clean.column(label)).as_py()
    assert overall > 0
    for name in SPLITS:
        rate = pc.mean(splits[name].column(label)).as_py()
        assert abs(rate - overall) <= MAX_RATE_GAP, (name, rate, overall)
        assert run[2].positives[name] == pc.sum(splits[name].column(label)).as_py()
        assert run[2].class_counts[name]["1"] == run[2].positives[name]


def test_time_split_puts_the_latest_events_in_test(run, tmp_path):
    """split.by: time: every train event precedes every valid event, which precede test."""
    config, ingested, _ = run
    timed = config.model_copy(update={"split": config.split.model_copy(update={"by": "time"})})
    result = rerun_features(timed, ingested.run_uri, tmp_path / "time")
    raw = read_dir(str(tmp_path / "time" / "features" / "test_raw"))
    clean = read_dir(ingested.output_uri)
    test_ids = set(raw.column("transaction_id").to_pylist())
    in_test = pc.is_in(clean.column("transaction_id"), value_set=pa.array(sorted(test_ids)))
    earliest_test = pc.min(clean.filter(in_test).column("timestamp")).as_py()
    latest_other = pc.max(clean.filter(pc.invert(in_test)).column("timestamp")).as_py()
    assert latest_other <= earliest_test
    assert abs(result.rows["test"] - 0.15 * clean.num_rows) <= 0.01 * clean.num_rows
    assert result.split["by"] == "time" and not result.split["stratified"]


def test_group_split_keeps_each_customer_in_one_split(run, tmp_path):
    config, ingested, _ = run
    grouped = config.model_copy(
        update={"split": config.split.model_copy(update={"by": "group", "group": "customer_id"})}
    )
    rerun_features(grouped, ingested.run_uri, tmp_path / "group")
    clean = read_dir(ingested.output_uri)
    raw = read_dir(str(tmp_path / "group" / "features" / "test_raw"))
    test_customers = set(raw.column("customer_id").to_pylist())
    test_ids = set(raw.column("transaction_id").to_pylist())
    for row in clean.select(["transaction_id", "customer_id"]).to_pylist():
        assert (row["transaction_id"] in test_ids) == (row["customer_id"] in test_customers)


def test_split_assignment_is_deterministic_per_seed(run, test_raw, tmp_path):
    config, ingested, first = run
    second = rerun_features(config, ingested.run_uri, tmp_path / "same-seed")
    assert second.rows == first.rows
    assert second.fingerprints == first.fingerprints
    again = read_dir(str(tmp_path / "same-seed" / "features" / "test_raw"))
    first_ids = set(test_raw.column("transaction_id").to_pylist())
    assert set(again.column("transaction_id").to_pylist()) == first_ids
    # A different seed gives a different split: the seed is what makes it repeatable.
    other = rerun_features(
        config.model_copy(update={"seed": config.seed + 1}),
        ingested.run_uri,
        tmp_path / "other-seed",
    )
    moved = read_dir(str(tmp_path / "other-seed" / "features" / "test_raw"))
    assert set(moved.column("transaction_id").to_pylist()) != first_ids
    assert sum(other.rows.values()) == sum(first.rows.values())


# --- point-in-time history ----------------------------------------------------------------------


def expected_history(frame: pd.DataFrame, customer: str) -> pd.DataFrame:
    """Per event: count, mean amount and gap over the customer's strictly earlier events.

    Events at the same second are ordered by transaction id, as they would be processed.
    """
    events = frame[frame.customer_id == customer]
    rows = []
    for event in events.itertuples():
        earlier = events[
            (events.timestamp < event.timestamp)
            | (
                (events.timestamp == event.timestamp)
                & (events.transaction_id < event.transaction_id)
            )
        ]
        mean = earlier.amount_usd.mean() if len(earlier) else np.nan
        rows.append(
            {
                "transaction_id": event.transaction_id,
                "hist_txn_count": float(len(earlier)),
                "hist_amount_mean": mean,
                "hist_amount_ratio": event.amount_usd / mean if len(earlier) else np.nan,
                "hist_seconds_since_prev": (
                    (event.timestamp - earlier.timestamp.max()).total_seconds()
                    if len(earlier)
                    else np.nan
                ),
            }
        )
    return pd.DataFrame(rows).set_index("transaction_id")


def assert_history_equal(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    actual = actual.loc[expected.index]
    for name in HISTORY:
        got = actual[name].to_numpy(dtype=float)
        want = expected[name].to_numpy(dtype=float)
        assert np.array_equal(np.isnan(got), np.isnan(want)), name
        assert np.allclose(got, want, rtol=1e-9, equal_nan=True), name


@pytest.fixture(scope="module")
def chosen_customers(clean_frame, test_raw) -> list[str]:
    counts = clean_frame.customer_id.value_counts()
    in_test = set(test_raw.column("customer_id").to_pylist())
    busiest = [c for c in counts.index if c in in_test][:3]
    rare = [c for c in counts[counts <= 3].index if c in in_test][:2]
    return busiest + rare


def test_history_features_never_use_the_future(run, clean, clean_frame, chosen_customers):
    config, _, _ = run
    batch = history_point_in_time(clean, config.features, "transaction_id")
    batch = batch.select(["transaction_id", *HISTORY]).to_pandas().set_index("transaction_id")
    checked = 0
    for customer in chosen_customers:
        expected = expected_history(clean_frame, customer)
        assert (expected.hist_txn_count == 0).sum() == 1  # exactly one first event
        assert_history_equal(batch, expected)
        checked += len(expected)
    assert checked > 50


def test_pipeline_history_output_matches_point_in_time(test_raw, clean_frame, chosen_customers):
    """The history columns the pipeline wrote for test rows are the point-in-time values."""
    written = test_raw.select(["transaction_id", *HISTORY]).to_pandas().set_index("transaction_id")
    for customer in chosen_customers:
        expected = expected_history(clean_frame, customer)
        expected = expected[expected.index.isin(written.index)]
        assert len(expected)
        assert_history_equal(written, expected)


def test_online_history_from_state_matches_batch(run, clean, test_raw):
    """Scoring one event online from the state of its earlier events gives the batch values."""
    config, _, _ = run
    features = config.features
    entity, amount, ts = features.history.entity, features.history.amount, features.timestamp
    rng = np.random.default_rng(0)
    firsts = np.flatnonzero(pc.equal(test_raw.column("hist_txn_count"), 0).to_numpy())
    sample = np.unique(np.r_[rng.choice(test_raw.num_rows, 60, replace=False), firsts[:5]])
    assert len(firsts) > 0
    events = test_raw.take(pa.array(sample))
    history = clean.select(["transaction_id", entity, amount, ts])
    for index in range(events.num_rows):
        event = events.slice(index, 1)
        customer, when, key = (event.column(c)[0] for c in (entity, ts, "transaction_id"))
        same = history.filter(pc.equal(history.column(entity), customer))
        earlier = same.filter(
            pc.or_(
                pc.less(same.column(ts), when),
                pc.and_(
                    pc.equal(same.column(ts), when), pc.less(same.column("transaction_id"), key)
                ),
            )
        )
        state = history_state(earlier, features)
        online = history_from_state(event.select([entity, amount, ts]), state, features)
        for name in HISTORY:
            got, want = online.column(name)[0].as_py(), event.column(name)[0].as_py()
            if want is None or np.isnan(want):
                assert got is None or np.isnan(got), (key, name, got)
            else:
                assert got == pytest.approx(want, rel=1e-9), (key, name, got, want)


# --- FeatureSpec --------------------------------------------------------------------------------


def test_transform_is_the_same_in_ray_data_batches_and_on_single_rows(ray_session, spec, test_raw):
    firsts = np.flatnonzero(pc.is_null(test_raw.column("hist_amount_mean")).to_numpy(False))
    assert len(firsts) > 0  # rows with missing values, imputed from the spec
    picked = np.unique(np.r_[np.arange(0, test_raw.num_rows, 10), firsts])
    table = test_raw.take(pa.array(picked))
    table = table.append_column("_row", pa.array(np.arange(table.num_rows)))

    def encode(batch: pa.Table, spec: FeatureSpec) -> pa.Table:
        return transform(batch, spec).append_column("_row", batch.column("_row"))

    batched = (
        ray_session.data.from_arrow(table)
        .repartition(4)
        .map_batches(encode, batch_format="pyarrow", batch_size=64, fn_kwargs={"spec": spec})
        .to_arrow_refs()
    )
    batched = pa.concat_tables(ray_session.get(batched)).sort_by("_row")
    assert batched.num_rows == table.num_rows
    single = pa.concat_tables([transform(table.slice(i, 1), spec) for i in range(table.num_rows)])
    for name in spec.feature_names:
        got = batched.column(name).to_numpy(zero_copy_only=False)
        want = single.column(name).to_numpy(zero_copy_only=False)
        assert np.isfinite(got).all() and np.isfinite(want).all(), name
        assert np.allclose(got, want), name


def test_feature_spec_round_trips_as_json_without_pickles(run, spec):
    _, _, result = run
    payload = Path(result.spec_uri).read_bytes()
    data = json.loads(payload)  # plain JSON: fails on pickle bytes
    assert FeatureSpec.model_validate_json(payload) == spec
    assert FeatureSpec.model_validate_json(spec.model_dump_json()) == spec
    assert spec.feature_names == [
        *spec.features.numeric,
        *spec.features.time_features,
        *spec.features.categorical,
    ]
    assert set(spec.medians) == {*spec.features.numeric, *spec.features.time_features}
    assert "pos" in spec.categories["channel"]

    def strings(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield key
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)
        elif isinstance(node, str):
            yield node

    for text in strings(data):
        assert not text.startswith(("gASV", "gAJ", "\x80")), text  # base64 / raw pickle headers
        assert "py/object" not in text


def test_lookups_exist_and_hold_the_online_state(run, clean):
    config, ingested, result = run
    assert set(result.lookup_uris) == {"customers", "merchants", "history"}
    for uri in result.lookup_uris.values():
        assert Path(uri).is_file(), uri
    customers = pq.read_table(result.lookup_uris["customers"])
    assert customers.num_rows == ingested.sources["customers"].rows_out
    merchants = pq.read_table(result.lookup_uris["merchants"])
    assert merchants.num_rows == ingested.sources["merchants"].rows_out
    history = pq.read_table(result.lookup_uris["history"]).to_pandas()
    entity = config.features.history.entity
    assert history[entity].is_unique
    frame = clean.select([entity, "timestamp", "amount_usd"]).to_pandas()
    expected = frame.groupby(entity).agg(
        count=("amount_usd", "size"), total=("amount_usd", "sum"), last=("timestamp", "max")
    )
    history = history.set_index(entity).loc[expected.index]
    assert (history.state_count.to_numpy() == expected["count"].to_numpy()).all()
    assert np.allclose(history.state_amount_sum, expected.total)
    assert (history.state_last_ts.to_numpy() == expected["last"].to_numpy()).all()
