"""Ingest on a real local Ray: row accounting, quarantine, bad files, schema errors, PII."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import os
import re
import shutil
from collections import Counter
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.errors import SchemaError, SourceError
from jobs.ingest import ingest
from tests.conftest import make_config

HEX32 = re.compile(r"^[0-9a-f]{32}$")
GARBAGE = b"this is not a parquet file\n" * 64
MALFORMED_CSV_LINE = "99999,2020-01-01,US,1990,leak@example.com,one-field-too-many\n"


def read_dir(uri: str) -> pa.Table:
    """All parquet files under a local folder, read with plain pyarrow."""
    files = sorted(p for p in Path(uri).rglob("*.parquet") if not p.name.startswith((".", "_")))
    assert files, f"no parquet files under {uri}"
    return pa.concat_tables([pq.read_table(f) for f in files])


def written_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def raw_transactions(data: Path) -> list[dict]:
    rows = []
    for file in sorted((data / "transactions").rglob("*.parquet")):
        rows += pq.read_table(file).to_pylist()
    return rows


def record_id(record: str) -> str:
    row = json.loads(record)
    return row.get("txn_id", row.get("transaction_id"))


@pytest.fixture(scope="module")
def ingested(ray_session, sample_data, tmp_path_factory):
    storage = tmp_path_factory.mktemp("ingest-store")
    config = make_config(sample_data, storage)
    return config, ingest(config), storage


@pytest.fixture(scope="module")
def quarantine(ingested) -> dict[str, pa.Table]:
    _, result, _ = ingested
    return {
        name: read_dir(f"{report.quarantine_uri}/rows") for name, report in result.sources.items()
    }


@pytest.fixture(scope="module")
def clean(ingested) -> dict[str, pa.Table]:
    _, result, _ = ingested
    return {name: read_dir(report.output_uri) for name, report in result.sources.items()}


@pytest.fixture(scope="module")
def raw(sample_data) -> list[dict]:
    return raw_transactions(sample_data)


@pytest.fixture(scope="module")
def reasons_by_id(quarantine) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for row in quarantine["transactions"].to_pylist():
        found.setdefault(record_id(row["record"]), []).append(row["reason"])
    return found


# --- row accounting -----------------------------------------------------------------------------


def test_rows_in_equals_rows_out_plus_quarantined(ingested):
    _, result, _ = ingested
    assert set(result.sources) == {"transactions", "customers", "merchants"}
    for name, report in result.sources.items():
        assert report.rows_in == report.rows_out + report.rows_quarantined, name
        assert report.rows_quarantined > 0, f"{name}: sample data has dirty rows on purpose"
        assert report.rows_out > 0, name
        assert sum(report.reasons.values()) == report.rows_quarantined, name


def test_rows_in_matches_the_source_files(ingested, sample_data):
    _, result, _ = ingested
    parquet_rows = sum(
        pq.read_metadata(f).num_rows for f in (sample_data / "transactions").rglob("*.parquet")
    )
    with open(sample_data / "customers" / "customers.csv", newline="") as handle:
        csv_rows = sum(1 for _ in csv.reader(handle)) - 1  # minus the header
    text = (sample_data / "merchants" / "merchants.jsonl").read_text()
    json_lines = sum(1 for line in text.splitlines() if line.strip())
    assert result.sources["transactions"].rows_in == parquet_rows
    assert result.sources["customers"].rows_in == csv_rows
    assert result.sources["merchants"].rows_in == json_lines
    assert result.sources["transactions"].files == len(
        list((sample_data / "transactions").rglob("*.parquet"))
    )


def test_clean_output_holds_rows_out(ingested, clean):
    _, result, _ = ingested
    for name, report in result.sources.items():
        assert clean[name].num_rows == report.rows_out, name
    assert result.output_uri == result.sources["transactions"].output_uri


def test_quarantine_holds_every_quarantined_row_with_reason_and_record(ingested, quarantine):
    _, result, _ = ingested
    for name, report in result.sources.items():
        table = quarantine[name]
        assert table.num_rows == report.rows_quarantined, name
        for row in table.to_pylist():
            assert row["source"] == name
            assert row["reason"], row
            assert row["record"], row
        assert Counter(table.column("reason").to_pylist()) == Counter(report.reasons), name


def test_report_json_matches_result(ingested):
    _, result, _ = ingested
    written = json.loads(Path(result.run_uri, "ingest", "_report.json").read_text())
    for name, report in result.sources.items():
        assert written[name]["rows_in"] == report.rows_in
        assert written[name]["rows_quarantined"] == report.rows_quarantined


# --- specific dirty rows ------------------------------------------------------------------------


def parses(text: str | None) -> bool:
    for layout in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"):
        try:
            datetime.strptime(text.strip(), layout)
            return True
        except (ValueError, AttributeError):
            continue
    return False


def test_unknown_currency_is_quarantined(raw, clean, reasons_by_id):
    dirty = [r for r in raw if r["ccy"] == "XXX"]
    assert dirty
    clean_ids = set(clean["transactions"].column("transaction_id").to_pylist())
    for row in dirty:
        assert row["txn_id"] not in clean_ids
        if parses(row["event_time"]):  # an unparseable time is an earlier failure
            assert reasons_by_id[row["txn_id"]][0] == "currency: unknown currency"


def test_unparseable_timestamp_is_quarantined_and_both_formats_parse(raw, clean, reasons_by_id):
    bad = {r["txn_id"] for r in raw if r["event_time"] == "not-a-time"}
    assert bad
    flagged = {
        key
        for key, reasons in reasons_by_id.items()
        if "timestamp: not a valid timestamp" in reasons
    }
    assert flagged == bad  # "2026-01-01 10:00:00" and "2026-01-01T10:00:00" both parse
    assert not bad & set(clean["transactions"].column("transaction_id").to_pylist())
    assert any(" " in r["event_time"] for r in raw)


def test_orphan_customers_are_quarantined(raw, clean, reasons_by_id):
    customer_ids = set(clean["customers"].column("customer_id").to_pylist())
    merchant_ids = set(clean["merchants"].column("merchant_id").to_pylist())
    orphans = [r for r in raw if str(r["cust_id"]) not in customer_ids]
    assert orphans
    clean_ids = set(clean["transactions"].column("transaction_id").to_pylist())
    otherwise_valid = 0
    for row in orphans:
        assert row["txn_id"] not in clean_ids
        earlier_failure = (
            row["amount"] is None
            or not 0.01 <= row["amount"] <= 100_000
            or row["ccy"].upper() not in {"USD", "EUR", "GBP", "CAD"}
            or not parses(row["event_time"])
            or row["channel"].lower() not in {"pos", "web", "app"}
        )
        if not earlier_failure:
            otherwise_valid += 1
            assert reasons_by_id[row["txn_id"]][0] == "customer_id: no such customers key"
        assert row["merchant"] in merchant_ids
    assert otherwise_valid > 0


def test_duplicate_ids_keep_exactly_one_copy(raw, clean, reasons_by_id):
    clean_ids = Counter(clean["transactions"].column("transaction_id").to_pylist())
    assert max(clean_ids.values()) == 1
    raw_ids = Counter(r["txn_id"] for r in raw)
    duplicated = [key for key, count in raw_ids.items() if count > 1]
    assert duplicated
    survivors = 0
    for key in duplicated:
        quarantined = reasons_by_id.get(key, [])
        assert clean_ids[key] + len(quarantined) == raw_ids[key]
        if clean_ids[key] == 1:
            survivors += 1
            assert quarantined == ["transaction_id: duplicate"] * (raw_ids[key] - 1)
        else:  # the row itself is invalid, so every copy is quarantined for that reason
            assert "transaction_id: duplicate" not in quarantined
    assert survivors >= len(duplicated) // 2


# --- unreadable files, schema errors, missing sources -------------------------------------------


@pytest.fixture(scope="module")
def corrupted(ray_session, sample_data, ingested, tmp_path_factory):
    """A copy of the sample data with an unreadable day file and a malformed CSV line."""
    data = tmp_path_factory.mktemp("corrupted-data")
    shutil.copytree(sample_data, data, dirs_exist_ok=True)
    bad_file = data / "transactions" / "day=2026-01-31" / "part-0.parquet"
    bad_file.parent.mkdir()
    bad_file.write_bytes(GARBAGE)
    with open(data / "customers" / "customers.csv", "a") as handle:
        handle.write(MALFORMED_CSV_LINE)
    storage = tmp_path_factory.mktemp("corrupted-store")
    config = make_config(data, storage)
    return ingest(config), str(bad_file), storage


def test_corrupted_file_is_reported_and_copied_while_the_rest_is_ingested(ingested, corrupted):
    _, original, _ = ingested
    result, bad_uri, _ = corrupted
    report = result.sources["transactions"]
    assert list(report.bad_files) == [bad_uri]
    assert "parquet" in report.bad_files[bad_uri]
    assert report.files == original.sources["transactions"].files + 1
    copies = list(Path(report.quarantine_uri, "files").iterdir())
    data_copies = [p for p in copies if p.read_bytes() == GARBAGE]
    assert len(data_copies) == 1
    reason_files = [p for p in copies if p.name.endswith(".reason.json")]
    assert [json.loads(p.read_text())["uri"] for p in reason_files] == [bad_uri]
    # Every other file is ingested exactly as before.
    before = original.sources["transactions"]
    assert (report.rows_in, report.rows_out) == (before.rows_in, before.rows_out)
    assert report.fingerprint["content_hash"] == before.fingerprint["content_hash"]
    assert read_dir(report.output_uri).num_rows == report.rows_out


def test_rename_to_missing_raw_column_raises_schema_error(ray_session, sample_data, tmp_path):
    storage = tmp_path / "store"
    rename = {
        "txn_id": "transaction_id",
        "customer": "customer_id",
        "merchant": "merchant_id",
        "ccy": "currency",
        "event_time": "timestamp",
        "is_fraud": "label",
    }
    config = make_config(sample_data, storage, **{"sources.transactions.rename": rename})
    with pytest.raises(SchemaError) as error:
        ingest(config)
    assert "'transactions'" in str(error.value)
    assert "'customer'" in str(error.value)
    assert not storage.exists() or written_files(storage) == []


def test_missing_source_uri_raises_source_error(ray_session, sample_data, tmp_path):
    storage = tmp_path / "store"
    missing = tmp_path / "nowhere" / "merchants"
    config = make_config(sample_data, storage, **{"sources.merchants.uri": str(missing)})
    with pytest.raises(SourceError) as error:
        ingest(config)
    assert "'merchants'" in str(error.value)
    assert str(missing) in str(error.value)
    assert not storage.exists() or written_files(storage) == []


# --- PII ----------------------------------------------------------------------------------------


def assert_no_raw_email(root: Path) -> None:
    files = written_files(root)
    assert files
    for file in files:
        payload = file.read_bytes()
        assert b"@example.com" not in payload, file
        if file.suffix == ".parquet" and payload.startswith(b"PAR1"):
            # Compressed pages hide plain text from a byte scan: look at the values too.
            text = json.dumps(pq.read_table(io.BytesIO(payload)).to_pylist(), default=str)
            assert "@example.com" not in text, file


def test_no_raw_email_anywhere_in_storage(ingested):
    assert_no_raw_email(ingested[2])


def test_malformed_csv_line_is_counted_and_quarantined(ingested, corrupted):
    before = ingested[1].sources["customers"]
    after = corrupted[0].sources["customers"]
    assert after.rows_in == before.rows_in + 1
    assert after.rows_out == before.rows_out
    assert after.reasons.get("csv: wrong number of fields") == 1


def test_no_raw_email_in_quarantine_of_malformed_lines(corrupted):
    assert_no_raw_email(corrupted[2])


def test_emails_are_keyed_hashes(clean):
    emails = clean["transactions"].column("customer_email").to_pylist()
    assert emails and all(isinstance(v, str) and HEX32.match(v) for v in emails)
    customers = clean["customers"].to_pylist()
    key = os.environ["RAYLINE_PII_KEY"].encode()
    first = next(row for row in customers if row["customer_id"] == "1")
    expected = hmac.new(key, b"user1@example.com", hashlib.sha256).hexdigest()[:32]
    assert first["email"] == expected  # joinable by whoever holds the key, and only by them
    assert len(set(row["email"] for row in customers)) == len(customers)


# --- fingerprint --------------------------------------------------------------------------------


def test_fingerprint_is_stable_across_runs(ray_session, ingested, sample_data, tmp_path):
    config, first, _ = ingested
    second = ingest(make_config(sample_data, tmp_path / "again"))
    assert second.run_uri != first.run_uri
    for name, report in first.sources.items():
        fingerprint = report.fingerprint
        assert set(fingerprint) >= {"schema", "rows", "content_hash"}
        assert fingerprint["rows"] == report.rows_out
        assert re.fullmatch(r"[0-9a-f]{16}", fingerprint["content_hash"])
        assert set(fingerprint["schema"]) >= set(config.sources[name].types) - {"email"}
        assert second.sources[name].fingerprint == fingerprint, name
    schema = first.sources["transactions"].fingerprint["schema"]
    assert schema["timestamp"].startswith("timestamp")
    assert schema["amount_usd"] == "double"
    assert len({r.fingerprint["content_hash"] for r in first.sources.values()}) == 3
