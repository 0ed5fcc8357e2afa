"""Standardization and row rules on plain Arrow tables (no Ray): what ingest and serving share."""

from __future__ import annotations

import json
import re
from datetime import datetime

import pyarrow as pa
import pytest

from jobs.config import SourceConfig
from jobs.validate import (
    SchemaError,
    apply_pii,
    check_rows,
    check_schema,
    keyed_hash,
    quarantine_records,
    standardize,
)

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def source(**fields) -> SourceConfig:
    return SourceConfig.model_validate({"format": "parquet", "uri": "unused", **fields})


def no_reasons(count: int) -> pa.Array:
    return pa.nulls(count, pa.string())


# --- standardize: types -------------------------------------------------------------------------


def test_strings_cast_to_int64_and_unparseable_values_are_flagged():
    table = pa.table({"qty": ["42", " 7 ", "3.0", "-5", "3.5", "seven", None]})
    result, reasons = standardize(table, source(types={"qty": "int64"}))
    assert result.schema.field("qty").type == pa.int64()
    assert result.column("qty").to_pylist() == [42, 7, 3, -5, None, None, None]
    expected = [None, None, None, None, "qty: not a valid int64", "qty: not a valid int64", None]
    assert reasons.to_pylist() == expected


def test_strings_cast_to_float64():
    table = pa.table({"price": ["1.5", "1e3", "-0.25", ".5", "abc", "", None]})
    result, reasons = standardize(table, source(types={"price": "float64"}))
    assert result.schema.field("price").type == pa.float64()
    assert result.column("price").to_pylist() == [1.5, 1000.0, -0.25, 0.5, None, None, None]
    flagged = [i for i, r in enumerate(reasons.to_pylist()) if r is not None]
    assert flagged == [4, 5]
    assert all(r == "price: not a valid float64" for r in reasons.to_pylist() if r)


def test_timestamps_parse_with_every_declared_format():
    table = pa.table(
        {"ts": ["2026-01-02T03:04:05", "2026-01-02 03:04:05", "02/01/2026", "not-a-time", None]}
    )
    config = source(
        types={"ts": "timestamp"}, timestamp_formats=["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]
    )
    result, reasons = standardize(table, config)
    assert result.schema.field("ts").type == pa.timestamp("s")
    values = result.column("ts").to_pylist()
    assert values[:2] == [datetime(2026, 1, 2, 3, 4, 5)] * 2
    assert values[2:] == [None, None, None]
    assert reasons.to_pylist() == [None, None] + ["ts: not a valid timestamp"] * 2 + [None]


def test_timestamp_format_not_declared_is_flagged():
    table = pa.table({"ts": ["2026-01-02 03:04:05"]})
    _, reasons = standardize(table, source(types={"ts": "timestamp"}))
    assert reasons.to_pylist() == ["ts: not a valid timestamp"]


def test_dates_and_bools():
    table = pa.table({"day": ["2026-03-01", "yesterday"], "flag": ["TRUE", "maybe"]})
    result, reasons = standardize(table, source(types={"day": "date", "flag": "bool"}))
    assert result.column("day").type == pa.date32()
    assert str(result.column("day")[0]) == "2026-03-01"
    assert result.column("flag").to_pylist() == [True, None]
    # Row 1 fails both: the first declared column's reason wins.
    assert reasons.to_pylist() == [None, "day: not a valid date"]


def test_rename_and_reason_uses_the_standard_name():
    table = pa.table({"cust_id": ["12", "x"], "unused": [1, 2]})
    config = source(rename={"cust_id": "customer_id"}, types={"customer_id": "int64"})
    result, reasons = standardize(table, config)
    assert result.column_names == ["customer_id"]  # undeclared columns are not kept
    assert result.column("customer_id").to_pylist() == [12, None]
    assert reasons.to_pylist() == [None, "customer_id: not a valid int64"]


def test_normalize():
    table = pa.table({"channel": [" WEB ", "Pos"], "country": ["gb ", "us"]})
    config = source(
        types={"channel": "string", "country": "string"},
        normalize={"channel": "lower", "country": "upper"},
    )
    result, _ = standardize(table, config)
    assert result.column("channel").to_pylist() == ["web", "pos"]
    assert result.column("country").to_pylist() == ["GB", "US"]


# --- standardize: currency ----------------------------------------------------------------------

CURRENCY = {
    "types": {"amount": "float64", "ccy": "string", "qty": "int64"},
    "normalize": {"ccy": "upper"},
    "currency": {
        "amount": "amount",
        "code": "ccy",
        "output": "amount_usd",
        "rates": {"USD": 1.0, "EUR": 1.08, "GBP": 1.27},
    },
}


def test_currency_conversion_and_unknown_currency():
    table = pa.table(
        {
            "amount": [10.0, 10.0, 10.0, 10.0, 10.0, None],
            "ccy": ["USD", "eur", "GBP", "XXX", None, "USD"],
            "qty": ["1", "1", "1", "1", "1", "1"],
        }
    )
    result, reasons = standardize(table, source(**CURRENCY))
    converted = result.column("amount_usd").to_pylist()
    assert converted[:3] == pytest.approx([10.0, 10.8, 12.7])
    assert converted[3:] == [None, None, None]
    assert reasons.to_pylist() == [None, None, None, "ccy: unknown currency", None, None]


def test_first_failure_wins_over_currency():
    table = pa.table({"amount": [1.0], "ccy": ["XXX"], "qty": ["lots"]})
    _, reasons = standardize(table, source(**CURRENCY))
    assert reasons.to_pylist() == ["qty: not a valid int64"]


# --- check_rows ---------------------------------------------------------------------------------

RULES = source(
    types={"id": "string", "amount": "float64", "channel": "string", "customer": "string"},
    rules=[
        {"check": "not_null", "column": "id"},
        {"check": "range", "column": "amount", "min": 0.01, "max": 100},
        {"check": "allowed", "column": "channel", "values": ["pos", "web"]},
        {"check": "unique", "column": "id"},
        {"check": "references", "column": "customer", "source": "customers"},
    ],
)


def rows_table() -> pa.Table:
    return pa.table(
        {
            "id": ["a", None, "c", "d", "e", "f", "g", None, "i"],
            "amount": [5.0, 5.0, 0.001, 1000.0, 5.0, 5.0, 0.01, -1.0, 100.0],
            "channel": ["pos", "pos", "pos", "pos", "fax", "web", None, "fax", "web"],
            "customer": ["c1", "c1", "c1", "c1", "c1", "c9", "c2", "c9", None],
        }
    )


def test_check_rows_each_rule_and_first_failure_wins():
    keys = {"customers": pa.array(["c1", "c2"])}
    reasons = check_rows(rows_table(), RULES, no_reasons(9), keys).to_pylist()
    assert reasons == [
        None,
        "id: is null",
        "amount: below 0.01",
        "amount: above 100.0",
        "channel: not allowed",
        "customer: no such customers key",
        None,  # min is inclusive; a null channel is not "not allowed"
        "id: is null",  # fails every rule: the first one in config order wins
        None,  # max is inclusive; a null reference is not an orphan
    ]


def test_check_rows_keeps_earlier_reasons():
    earlier = pa.array(["amount: not a valid float64"] + [None] * 8, pa.string())
    reasons = check_rows(rows_table(), RULES, earlier, {"customers": pa.array(["c1", "c2"])})
    assert reasons[0].as_py() == "amount: not a valid float64"


def test_references_skipped_without_reference_keys():
    # Online scoring has no reference tables: the rule must not flag anything there.
    reasons = check_rows(rows_table(), RULES, no_reasons(9), None).to_pylist()
    assert reasons[5] is None


# --- PII ----------------------------------------------------------------------------------------


def test_keyed_hash_depends_on_the_key():
    values = pa.array(["user1@example.com", "user2@example.com", None])
    first = keyed_hash(values, b"key-one").to_pylist()
    again = keyed_hash(values, b"key-one").to_pylist()
    other = keyed_hash(values, b"key-two").to_pylist()
    assert first == again
    assert first[0] != first[1]
    assert first[0] != other[0] and first[1] != other[1]
    assert all(HEX32.match(v) for v in first[:2] + other[:2])
    assert first[2] is None and other[2] is None


def test_apply_pii_hashes_and_drops():
    table = pa.table(
        {
            "id": ["1", "2"],
            "email": ["user1@example.com", "user2@example.com"],
            "phone": ["555-0100", "555-0101"],
        }
    )
    result = apply_pii(table, {"email": "hash", "phone": "drop", "absent": "drop"}, b"k")
    assert result.column_names == ["id", "email"]
    emails = result.column("email").to_pylist()
    assert all(HEX32.match(v) for v in emails)
    assert "user1@example.com" not in json.dumps(result.to_pylist())
    assert emails == keyed_hash(table.column("email"), b"k").to_pylist()


def test_quarantine_records_hide_pii_in_raw_names():
    raw = pa.table({"mail": ["user1@example.com", "user2@example.com"], "ssn": ["1", "2"]})
    reasons = pa.array([None, "x: bad"], pa.string())
    records = quarantine_records(
        raw, reasons, {"email": "hash", "ssn": "drop"}, b"k", {"mail": "email"}
    ).to_pylist()
    assert records[0] is None  # only failing rows carry a record
    record = json.loads(records[1])
    assert record == {"mail": keyed_hash(pa.array(["user2@example.com"]), b"k")[0].as_py()}


# --- schema -------------------------------------------------------------------------------------


def test_check_schema_names_source_and_missing_column():
    config = source(
        rename={"cust_id": "customer_id"}, types={"customer_id": "string", "x": "int64"}
    )
    check_schema(["cust_id", "x", "extra"], config, "transactions", "day1.parquet")
    with pytest.raises(SchemaError) as error:
        check_schema(["customer_id", "x"], config, "transactions", "day1.parquet")
    message = str(error.value)
    assert "'transactions'" in message
    assert "'cust_id'" in message and "'customer_id'" in message
    assert "day1.parquet" in message
