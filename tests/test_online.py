"""The compiled online path (`jobs.online`) against the batch path it replaces for requests:
the same float32 matrix bit for bit, the same scores and the same reason for every record.
"""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import xgboost as xgb

from jobs import online
from jobs.config import FeaturesConfig, JoinConfig, SourceConfig
from jobs.errors import SourceError
from jobs.featurespec import FeatureSpec, enrich, feature_matrix, feature_names, transform
from jobs.online import OnlineScorer, records_table
from jobs.predict import score_records
from jobs.registry import Bundle, load_bundle
from jobs.storage import Storage, join

NAMES = {"txn_id": "transaction_id", "cust_id": "customer_id", "merchant": "merchant_id"}
NAMES |= {"ccy": "currency", "event_time": "timestamp"}


def batch_path(bundle: Bundle, records: list[dict]):
    """The reference: matrix, reasons and scores as `score_records` computes them."""
    table = records_table(records, bundle.spec)
    enriched, reasons = enrich(table, bundle.spec, bundle.lookups)
    matrix = feature_matrix(transform(enriched, bundle.spec), bundle.spec.feature_names)
    return matrix, reasons.to_pylist(), score_records(bundle, table)[0]


def assert_parity(bundle: Bundle, records: list[dict], scorer=None, compiled: bool = True):
    """Bitwise equal matrices, equal scores and reasons; `compiled`: without the Arrow path."""
    scorer = scorer or OnlineScorer.from_bundle(bundle)
    matrix, reasons, scores = batch_path(bundle, records)
    with pytest.MonkeyPatch.context() as patch:
        if compiled:
            patch.setattr(online, "enrich", None)  # a fallback would fail here
        online_matrix, online_reasons = scorer.features(records)
        online_scores, again = scorer.score(records)
    assert online_matrix.dtype == np.float32 and online_matrix.shape == matrix.shape
    bad = np.argwhere(matrix.view(np.uint32) != online_matrix.view(np.uint32))
    assert not len(bad), [(records[i], bundle.spec.feature_names[j]) for i, j in bad[:3]]
    assert online_reasons == reasons
    assert again == reasons and online_scores.dtype == scores.dtype
    assert np.array_equal(online_scores, scores, equal_nan=True)
    return reasons


def test_ascii_whitespace_and_case_are_arrows():
    """The compiled path strips and case-maps ASCII in Python and sends the rest to Arrow."""
    text = [f"{chr(c)}x{chr(c)}" for c in range(128)] + [chr(c) for c in range(128)]
    array = pa.array(text)
    assert pc.utf8_trim_whitespace(array).to_pylist() == [t.strip() for t in text]
    assert pc.utf8_lower(array).to_pylist() == [t.lower() for t in text]
    assert pc.utf8_upper(array).to_pylist() == [t.upper() for t in text]


def synthetic_bundle(shops: pa.Table | None = None) -> Bundle:
    """A regression bundle over every column type the fraud sample lacks: int64 join keys and
    categories, bools, a date as event time, history keyed by an int (no pipeline needed)."""
    source = SourceConfig(
        format="parquet",
        uri="unused",
        primary_key="id",
        types={"id": "string", "shop": "int64", "amt": "float64", "paid": "bool"}
        | {"day": "date", "tier": "string", "y": "float64"},
        normalize={"tier": "lower"},
        rules=[
            {"check": "not_null", "column": "id"},
            {"check": "range", "column": "amt", "min": 0, "max": 1000},
            {"check": "range", "column": "shop", "min": 1},
            {"check": "allowed", "column": "tier", "values": ["a", "b", "ä"]},
            {"check": "unique", "column": "id"},
        ],
    )
    features = FeaturesConfig(
        label="y",
        timestamp="day",
        numeric=["amt", "paid", "shop_size", "since", "built", "odd"]
        + ["hist_txn_count", "hist_amount_mean", "hist_amount_ratio", "hist_seconds_since_prev"],
        log_transform=["amt", "hist_amount_mean"],
        categorical=["tier", "shop", "shop_vip"],
        time_features=["hour", "day_of_week"],
        derived={
            "since": {"kind": "days_since", "columns": ["shop_opened"]},
            "built": {"kind": "years_since_year", "columns": ["shop_year"]},
            "odd": {"kind": "not_equal", "columns": ["shop", "shop_year"]},
        },
        history={"entity": "shop", "amount": "amt"},
    )
    names = feature_names(features)
    spec = FeatureSpec(
        task="regression",
        classes=[],
        source=source,
        joins=[JoinConfig(source="shops", key="shop", prefix="shop_")],
        features=features,
        medians={name: 1.5 for name in names[::2]},
        categories={"tier": ["b", "a", "ä", "b"], "shop": ["3", "1"], "shop_vip": ["true"]},
        feature_names=names,
    )
    if shops is None:
        shops = pa.table(
            {
                "shop": pa.array([1, 2, 3, 4], pa.int64()),
                "opened": pa.array([date(2020, 1, 1), None, date(1950, 6, 1), date(2030, 1, 1)]),
                "year": pa.array([1990, 2, None, 3], pa.int64()),
                "size": [1.5, None, 2.5, float("nan")],
                "vip": [True, False, None, True],
            }
        )
    history = pa.table(
        {
            "shop": pa.array([1, 2, 4], pa.int64()),
            "state_count": pa.array([3, 0, 2], pa.int64()),
            "state_amount_sum": [30.0, 0.0, 0.0],
            "state_last_ts": pa.array([0, 1_700_000_000_000, None], pa.timestamp("ms")),
        }
    )
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, len(names))), rng.normal(size=300)
    booster = xgb.train({"max_depth": 3}, xgb.DMatrix(x, y), num_boost_round=5)
    lookups = {"shops": shops, "history": history}
    return Bundle("synthetic", 1, booster, spec, lookups, None, {}, {})


def synthetic_records(count: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    tiers = ["a", " B ", "ä", "Ä ", "c", "\x1cA\t", "ß", 7]
    amounts = [0.0, -0.0, -3.0, 1e-300, 999.99, 1000.5, 1e308, math.inf, math.nan, 5, 12.25]
    records = []
    for i in range(count):
        day = date(1969, 12, 31) + timedelta(days=int(rng.integers(-40000, 40000)))
        record = {
            "id": f"r{i}" if i % 50 else i,
            "shop": int(rng.integers(-1, 7)),
            "amt": amounts[i % len(amounts)] if i % 3 == 0 else float(rng.lognormal(3, 2)),
            "paid": bool(rng.integers(2)),
            "day": day,
            "tier": tiers[int(rng.integers(len(tiers)))],
        }
        for key in list(record):  # about one value in ten is missing, or null
            if rng.random() < 0.1:
                record.pop(key) if rng.random() < 0.5 else record.update({key: None})
        records.append(record)
    return records


def test_synthetic_parity_over_every_column_type():
    bundle = synthetic_bundle()
    scorer = OnlineScorer.from_bundle(bundle)
    assert scorer.arrow_only is None
    reasons = assert_parity(bundle, synthetic_records(3000), scorer)
    assert set(reasons) >= {"amt: below 0.0", "amt: above 1000.0", "amt: not a finite number"}
    assert set(reasons) >= {"id: is null", "tier: not allowed", "shop: below 1.0", None}
    assert_parity(bundle, [], scorer)
    assert_parity(bundle, [{}], scorer)


def test_what_the_batch_path_refuses_is_refused_alike():
    bundle = synthetic_bundle()
    scorer = OnlineScorer.from_bundle(bundle)
    for bad, error in (({"amt": 2**53 + 1}, pa.ArrowInvalid), ({"tier": "\ud800"}, UnicodeError)):
        record = {"id": "x", **bad}
        with pytest.raises(error):
            batch_path(bundle, [record])
        with pytest.raises(error):
            scorer.score([record])
    shops = bundle.lookups["shops"]
    doubled = synthetic_bundle(pa.concat_tables([shops, shops.slice(1, 1)]))  # shop 2 twice
    scorer = OnlineScorer.from_bundle(doubled)
    with pytest.raises(SourceError):
        batch_path(doubled, [{"id": "x", "shop": 2}])
    with pytest.raises(SourceError):
        scorer.score([{"id": "x", "shop": 2}])
    assert_parity(doubled, [{"id": "x", "shop": 1}, {"id": "y", "shop": 9}], scorer)
    assert_parity(doubled, [{"id": "x", "amt": 2**53}, {"id": "y", "amt": -(2**53)}], scorer)


def test_a_spec_not_compiled_goes_through_arrow():
    shops = synthetic_bundle().lookups["shops"]
    narrow = shops.set_column(2, "year", pc.cast(shops.column("year"), pa.int32()))
    bundle = synthetic_bundle(narrow)
    scorer = OnlineScorer.from_bundle(bundle)
    assert scorer.arrow_only is not None
    assert_parity(bundle, synthetic_records(200), scorer, compiled=False)


def test_records_table_stores_aware_timestamps_as_naive_utc():
    """The one records -> Arrow conversion (serving's fallback and the batch parity tests)."""
    for hours in (-5, 0, 2, 14):
        aware = datetime(2026, 1, 5, 1, 3, 25, 999, tzinfo=timezone(timedelta(hours=hours)))
        expected = (aware - timedelta(hours=hours)).replace(tzinfo=None)
        assert online._utc_naive(aware) == expected
    naive = datetime(2026, 1, 5, 1, 3, 25)
    assert online._utc_naive(naive) is naive and online._utc_naive(None) is None


@pytest.fixture(scope="module")
def bundle(pipeline_run):
    config, _ = pipeline_run
    return load_bundle(Storage(config.s3), join(config.storage, "registry"), config.name)


@pytest.fixture(scope="module")
def records(sample_data) -> list[dict]:
    """5,000 sample transactions as HTTP records (datetimes, int customer ids, dirty rows)."""
    files = sorted(Path(sample_data, "transactions").rglob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files]).drop_columns(["is_fraud"])
    rows = table.take(np.random.default_rng(3).permutation(table.num_rows)[:5000]).to_pylist()
    out = []
    for row in rows:
        record = {NAMES.get(k, k): v for k, v in row.items()}
        try:
            record["timestamp"] = datetime.fromisoformat(record["timestamp"])
        except (TypeError, ValueError):  # "not-a-time" never passes the HTTP schema
            record["timestamp"] = None
        out.append(record)
    return out


EDGES = [
    {"merchant_id": None, "channel": None, "currency": None},
    {"channel": " WEB "},
    {"channel": "Wéb"},
    {"channel": "kiosk", "currency": "eur"},
    {"merchant_id": "M99999"},
    {"customer_id": "999999999"},
    {"customer_id": 42, "transaction_id": 7, "merchant_id": None},
    {"timestamp": datetime(2020, 1, 1)},
    {"timestamp": datetime(1969, 12, 31, 23, 59, 59, 500000)},
    {"timestamp": datetime(2026, 1, 3, 23, 30, 0, 999999, tzinfo=timezone(timedelta(hours=-5)))},
    {"timestamp": datetime(2026, 1, 4, 1, 0, tzinfo=timezone.utc)},
    {"timestamp": None},
    {"transaction_id": None},
    {"customer_id": None, "amount": None},
    {"amount": 0.0},
    {"amount": -0.0},
    {"amount": -12.5},
    {"amount": 100000.01},
    {"amount": 99999.99, "currency": "GBP"},
    {"amount": 1.7e308, "currency": "GBP"},
    {"amount": math.inf},
    {"amount": math.nan},
    {"amount": 50},
    {"currency": "XXX", "transaction_id": None, "amount": None},
    {"currency": " gbp\u3000"},
]


@pytest.mark.slow
def test_fraud_parity_on_sample_transactions_and_edge_cases(bundle, records):
    scorer = OnlineScorer.from_bundle(bundle)
    assert scorer.arrow_only is None
    reasons = assert_parity(bundle, records, scorer)
    assert sum(r is None for r in reasons) > 0.95 * len(records)
    assert {"amount: is null", "currency: unknown currency"} <= set(reasons)
    clean = next(r for r, reason in zip(records, reasons, strict=True) if reason is None)
    edges = [{**clean, **edge} for edge in EDGES] + [{}]
    reasons = assert_parity(bundle, edges, scorer)
    assert reasons[-3] == "currency: unknown currency" and reasons[-1] is not None
    assert {"amount: not a finite number", "amount_usd: not a finite number"} <= set(reasons)


@pytest.mark.slow
def test_one_at_a_time_equals_one_batch(bundle, records):
    scorer = OnlineScorer.from_bundle(bundle)
    together, _ = scorer.score(records[:200])
    alone = np.concatenate([scorer.score([record])[0] for record in records[:200]])
    assert np.array_equal(together, alone, equal_nan=True)


# Per sample table: a rule violation, a null feature, an unknown category.
EDITS = {
    "survey": ({"age": 12}, {"income": None}, {"region": " Far "}),
    "segments": ({"spend": -1.0}, {"visits": None}, {"favourite_color": "purple"}),
    "houses": ({"sqft": 10}, {"rooms": None}, {"city": "oslo"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(EDITS))
def test_other_tasks_parity(kind, ray_session, tmp_path):
    """Binary with Platt calibration and no timestamp, multiclass (probability rows), and
    regression with a date as event time."""
    from jobs import sample_tables
    from jobs.config import load_config
    from jobs.pipeline import run_pipeline
    from tests.conftest import ROOT

    sample_tables.generate_table(kind, str(tmp_path / "data"), rows=1500, seed=3)
    plain = load_config(ROOT / "configs" / f"{kind}.yaml")
    overrides = {"storage": str(tmp_path / "artifacts"), "train.num_boost_round": 30}
    config = load_config(
        ROOT / "configs" / f"{kind}.yaml",
        {**overrides, f"sources.{plain.fact}.uri": str(tmp_path / "data")},
    )
    run_pipeline(config, quiet=True)
    bundle = load_bundle(Storage(), join(config.storage, "registry"), config.name)
    if kind == "survey":
        rows = pacsv.read_csv(pa.py_buffer(sample_tables.survey(1000, 9)[0])).to_pylist()
    elif kind == "segments":
        rows = sample_tables.segments(1000, 9).to_pylist()
    else:
        rows = sample_tables.houses(1000, 9)
    rename, label = config.sources[config.fact].rename, config.features.label
    records = [{rename.get(k, k): v for k, v in row.items()} for row in rows]
    for record in records:
        record.pop(label)
        if kind == "houses":
            record["listed_on"] = date.fromisoformat(record["listed_on"])
    records += [{**records[i], **edit} for i, edit in enumerate(EDITS[kind])] + [{}]
    assert OnlineScorer.from_bundle(bundle).arrow_only is None
    reasons = assert_parity(bundle, records)
    assert reasons[-4] is not None and reasons[-3:-1] == [None, None]
