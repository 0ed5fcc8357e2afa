"""Bad input in batch ingest, on a real local Ray with real files: each case is set aside with a
reason, the run goes on, and every file, row and line is accounted for.

Expected counts are taken independently of the code under test: parquet footers and tables read
with plain pyarrow, lines counted as b"\\n" in the bytes written, CSV fields with Python's csv.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.config import SourceConfig, parse_config
from jobs.errors import SourceError
from jobs.ingest import SourceReport, _account, ingest
from jobs.sources import probe
from jobs.storage import Storage
from jobs.textfiles import read_csv
from jobs.validate import check_rows, join_dimensions, standardize
from tests.conftest import make_config


def read_dir(uri: str) -> pa.Table:
    files = sorted(p for p in Path(uri).rglob("*.parquet") if not p.name.startswith((".", "_")))
    assert files, f"no parquet files under {uri}"
    return pa.concat_tables([pq.read_table(f) for f in files])


def quarantined(report) -> list[dict]:
    return read_dir(f"{report.quarantine_uri}/rows").to_pylist()


def data_lines(data: bytes) -> list[bytes]:
    """Physical lines after the header, split on b"\\n" only (independent of the reader)."""
    return data.split(b"\n")[1:-1] if data.endswith(b"\n") else data.split(b"\n")[1:]


def blank_count(lines: list[bytes]) -> int:
    return sum(1 for line in lines if not line.strip())


def assert_accounted(report, clean: pa.Table | None = None) -> None:
    """in = out + quarantined, both sides as written to storage."""
    assert report.rows_in == report.rows_out + report.rows_quarantined
    assert sum(report.reasons.values()) == report.rows_quarantined
    assert len(quarantined(report)) == report.rows_quarantined
    clean = read_dir(report.output_uri) if clean is None else clean
    assert clean.num_rows == report.rows_out


ITEM_TYPES = {
    "id": "string",
    "email": "string",
    "note": "string",
    "amount": "float64",
    "label": "int64",
}
ITEM_RULES = [
    {"check": "not_null", "column": "id"},
    {"check": "not_null", "column": "amount"},
    {"check": "range", "column": "amount", "min": 0},
]


def items_config(tmp_path: Path, data: bytes, file_format: str = "csv", **fields):
    """A one-source config over one file holding `data`; the source is the fact table."""
    folder = tmp_path / "items"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"items.{file_format}").write_bytes(data)
    source = {
        "format": file_format,
        "uri": str(folder),
        "types": ITEM_TYPES,
        "rules": ITEM_RULES,
        "pii": {"email": "hash"},
        **fields,
    }
    return parse_config(
        {
            "name": "robustness",
            "storage": str(tmp_path / "store"),
            "sources": {"items": source},
            "fact": "items",
            "features": {"label": "label", "numeric": ["amount"]},
            "pii": {"allow_demo_key": True},
        }
    )


def ingest_items(tmp_path: Path, data: bytes, file_format: str = "csv", **fields):
    return ingest(items_config(tmp_path, data, file_format, **fields)).sources["items"]


def assert_no_email(report) -> None:
    for root in (report.output_uri, report.quarantine_uri):
        text = json.dumps(read_dir(root).to_pylist(), default=str)
        assert "@example.com" not in text


# --- 1. a parquet file with an intact footer and a corrupt page ---------------------------------


def corrupt_copy(good: bytes) -> bytes:
    """Flips bytes in the middle of a parquet file until the footer still reads but the data
    does not (found with plain pyarrow, so the test does not depend on the code under test)."""
    for position in range(len(good) // 2, len(good) - 1024, 61):
        damaged = bytearray(good)
        for offset in range(8):
            damaged[position + offset] ^= 0xFF
        try:
            pq.read_metadata(io.BytesIO(bytes(damaged)))
        except Exception:
            continue
        try:
            pq.read_table(io.BytesIO(bytes(damaged)))
        except (OSError, pa.ArrowException):
            return bytes(damaged)
    raise AssertionError("no corrupting position found")


def test_corrupt_parquet_page_is_quarantined_and_the_run_goes_on(
    ray_session, sample_data, tmp_path
):
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    days = sorted((data / "transactions").rglob("*.parquet"))
    victim = days[len(days) // 2]
    victim.write_bytes(corrupt_copy(victim.read_bytes()))
    result = ingest(make_config(data, tmp_path / "store"))
    report = result.sources["transactions"]
    assert list(report.bad_files) == [str(victim)]
    assert report.bad_files[str(victim)].startswith("unreadable parquet file: ")
    assert report.files == len(days)
    # Its rows are unknown: rows_in counts the readable files only (their footers).
    readable = sum(pq.read_metadata(day).num_rows for day in days if day != victim)
    assert report.rows_in == readable
    assert_accounted(report)
    note = next(Path(report.quarantine_uri, "files").glob("*.reason.json"))
    assert json.loads(note.read_text())["uri"] == str(victim)
    assert len(result.fact_blocks) == len(days) - 1


# --- 2. NaN and infinity ------------------------------------------------------------------------

NUMBERS = {
    "types": {"id": "string", "amount": "float64", "ccy": "string", "score": "float64"},
    "rules": [
        {"check": "not_null", "column": "amount"},
        {"check": "range", "column": "amount", "min": 0},
    ],
    "currency": {"amount": "amount", "code": "ccy", "output": "usd", "rates": {"USD": 1, "GBP": 2}},
}


def test_nan_is_missing_and_infinity_is_never_valid():
    nan, inf = float("nan"), float("inf")
    table = pa.table(
        {
            "id": list("abcdefgh"),
            "amount": [1.0, nan, inf, -inf, None, 5.0, 1e308, 2.0],
            "ccy": ["USD"] * 6 + ["GBP", "USD"],
            "score": [0.5, 0.5, 0.5, 0.5, 0.5, nan, 0.5, inf],
        }
    )
    source = SourceConfig.model_validate({"format": "parquet", "uri": "unused", **NUMBERS})
    result, reasons = standardize(table, source)
    reasons = check_rows(result, source, reasons).to_pylist()
    assert reasons == [
        None,
        "amount: is null",  # NaN is a missing value
        "amount: not a finite number",
        "amount: not a finite number",
        "amount: is null",
        None,  # an optional column's NaN is just null
        "usd: not a finite number",  # 1e308 * 2 overflows
        "score: not a finite number",
    ]
    assert result.column("score")[5].as_py() is None


def text_column(values: list[str], kind: str) -> tuple[list, list]:
    source = SourceConfig.model_validate({"format": "csv", "uri": "unused", "types": {"v": kind}})
    result, reasons = standardize(pa.table({"v": values}), source)
    return result.column("v").to_pylist(), reasons.to_pylist()


def test_text_nan_inf_and_overflow_do_not_pass_as_numbers():
    values, reasons = text_column(
        ["nan", "inf", "-Infinity", "NaN", "0x10", "1e999", "-1e999", "1e5", " 2.5 "], "float64"
    )
    invalid, infinite = "v: not a valid float64", "v: not a finite number"
    assert reasons == [invalid] * 5 + [infinite] * 2 + [None] * 2
    assert values[7:] == [1e5, 2.5]
    values, reasons = text_column(
        ["1e999", "1e30", "3.5", "nan", "3.0", "+4", "9007199254740993", "-7"], "int64"
    )
    assert reasons == ["v: not a valid int64"] * 4 + [None] * 4
    assert values == [None] * 4 + [3, 4, 9007199254740993, -7]  # exact, not via float64


def test_float_column_to_int64_never_truncates():
    source = SourceConfig.model_validate(
        {"format": "parquet", "uri": "unused", "types": {"v": "int64"}}
    )
    table = pa.table({"v": [3.0, 3.5, float("nan"), float("inf"), 1e30, None]})
    result, reasons = standardize(table, source)
    assert result.column("v").to_pylist() == [3, None, None, None, None, None]
    flagged = ["v: not a valid int64"] * 3
    assert reasons.to_pylist() == [None, flagged[0], None, *flagged[1:], None]


def test_nan_and_infinity_in_files_are_quarantined_with_a_reason(ray_session, tmp_path):
    rows = [
        ("a", 1.0, 0),
        ("b", float("nan"), 0),
        ("c", float("inf"), 1),
        ("d", -float("inf"), 0),
        ("e", 2.0, 1),
    ]
    table = pa.table(
        {
            "id": [r[0] for r in rows],
            "email": [f"{r[0]}@example.com" for r in rows],
            "note": ["n"] * 5,
            "amount": [r[1] for r in rows],
            "label": [r[2] for r in rows],
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    report = ingest_items(tmp_path / "parquet", sink.getvalue(), "parquet")
    assert report.reasons == {"amount: is null": 1, "amount: not a finite number": 2}
    assert read_dir(report.output_uri).column("id").to_pylist() == ["a", "e"]
    assert_accounted(report)

    text = (
        b"id,email,note,amount,label\n"
        b"a,a@example.com,n,1.5,0\nb,b@example.com,n,nan,0\nc,c@example.com,n,inf,0\n"
        b"d,d@example.com,n,1e999,0\ne,e@example.com,n,2.5,1e999\n"
    )
    report = ingest_items(tmp_path / "csv", text)
    assert report.reasons == {
        "amount: not a valid float64": 2,
        "amount: not a finite number": 1,
        "label: not a valid int64": 1,
    }
    assert_accounted(report)

    lines = [
        '{"id": "a", "amount": 1.5, "label": 0, "email": "a@example.com", "note": "n"}',
        '{"id": "b", "amount": NaN, "label": 0, "email": "b@example.com", "note": "n"}',
        '{"id": "c", "amount": Infinity, "label": 0, "email": "c@example.com", "note": "n"}',
        '{"id": "d", "amount": 1e999, "label": 0, "email": "d@example.com", "note": "n"}',
        '{"id": "e", "amount": "-1e999", "label": 0, "email": "e@example.com", "note": "n"}',
    ]
    report = ingest_items(tmp_path / "jsonl", ("\n".join(lines) + "\n").encode(), "jsonl")
    assert report.reasons == {
        "amount: not a valid float64": 2,  # NaN / Infinity are not JSON numbers
        "amount: not a finite number": 2,
    }
    clean = read_dir(report.output_uri)
    assert clean.column("id").to_pylist() == ["a"]
    assert all(math.isfinite(v) for v in clean.column("amount").to_pylist())
    assert_accounted(report, clean)


# --- 3. CSV records and lines -------------------------------------------------------------------

UNBALANCED = (
    b"id,email,note,amount,label\n"
    b"1,a@example.com,ok,10.5,0\n"
    b'2,b@example.com,"never closed,20.0,1\n'
    b"3,c@example.com,ok,30.0,0\n"
    b"4,d@example.com,ok,40.0,1\n"
    b"5,e@example.com,ok,50.0,0\n"
)


@pytest.mark.parametrize("multiline", [False, True])
def test_unbalanced_quote_costs_only_its_own_line(ray_session, tmp_path, multiline):
    report = ingest_items(tmp_path, UNBALANCED, multiline=multiline)
    lines = data_lines(UNBALANCED)
    assert report.lines == len(lines) == 5
    assert report.rows_in == len(lines) - blank_count(lines)
    assert (report.rows_out, report.rows_quarantined) == (4, 1)
    clean = read_dir(report.output_uri)
    assert sorted(clean.column("id").to_pylist()) == ["1", "3", "4", "5"]
    [bad] = quarantined(report)
    assert bad["reason"] == "csv: malformed quoting"
    record = json.loads(bad["record"])
    assert record["line"] == 3  # the source has PII: its number and digest only
    assert record["sha256"] == hashlib.sha256(UNBALANCED.split(b"\n")[2]).hexdigest()
    assert_accounted(report, clean)
    assert_no_email(report)


MULTILINE = (
    b"id,email,note,amount,label\r\n"
    b'1,a@example.com,"first\r\nsecond",10.0,0\r\n'
    b'2,b@example.com,"never closed,20.0,1\r\n'
    b"3,c@example.com,plain,30.0,0\r\n"
    b"\r\n"
    b'4,d@example.com,"x ""quoted"", y",40.0,1\r\n'
    b'5,e@example.com,"para one\n\npara two",50.0,0\n'
    b"6,f@example.com,plain,60.0,1,extra\n"
)


def test_multiline_records_and_line_accounting(ray_session, tmp_path):
    report = ingest_items(tmp_path, MULTILINE, multiline=True)
    lines = data_lines(MULTILINE)
    # Records 1 and 5 span 2 and 3 lines; one blank line between records.
    assert report.lines == len(lines) == 10
    assert (report.rows_in, report.blank_lines, report.continuation_lines) == (6, 1, 3)
    assert report.lines == report.rows_in + report.blank_lines + report.continuation_lines
    clean = read_dir(report.output_uri)
    notes = dict(zip(clean.column("id").to_pylist(), clean.column("note").to_pylist(), strict=True))
    assert notes == {
        "1": "first\r\nsecond",
        "3": "plain",
        "4": 'x "quoted", y',
        "5": "para one\n\npara two",
    }
    bad = {row["reason"]: json.loads(row["record"])["line"] for row in quarantined(report)}
    assert bad == {"csv: malformed quoting": 4, "csv: wrong number of fields": 11}
    assert_accounted(report, clean)


def test_without_multiline_every_physical_line_is_one_record(ray_session, tmp_path):
    report = ingest_items(tmp_path, MULTILINE, multiline=False)
    lines = data_lines(MULTILINE)
    assert report.lines == len(lines)
    assert report.blank_lines == blank_count(lines) == 2
    assert report.rows_in == len(lines) - blank_count(lines)
    assert sorted(read_dir(report.output_uri).column("id").to_pylist()) == ["3", "4"]
    assert_accounted(report)


def test_a_million_line_csv_reads_in_seconds():
    header = b"id,email,note,amount,label\n"
    body = b"".join(b'%d,u%d@x.org,"a, b",%d.5,0\n' % (i, i, i) for i in range(1_000_000))
    broken = body.replace(b'500,u500@x.org,"a, b"', b'500,u500@x.org,"a, b', 1)
    types = dict.fromkeys(["id", "email", "note", "amount"], "string")
    source = SourceConfig.model_validate({"format": "csv", "uri": "unused", "types": types})
    started = time.perf_counter()
    table, counts = read_csv(header + broken, source, b"k")
    seconds = time.perf_counter() - started
    assert counts["rows"] == table.num_rows == broken.count(b"\n") == 1_000_000
    assert table.column("_reason").null_count == 999_999
    assert seconds < 30, f"{seconds:.1f} s for 1M lines"


# --- 4. encodings and line ends -----------------------------------------------------------------


def test_invalid_utf8_line_is_quarantined_never_replaced(ray_session, tmp_path):
    data = (
        b"id,email,note,amount,label\n"
        b"1,a@example.com,caf\xc3\xa9,10.0,0\n"
        b"2,b@example.com,caf\xe9,20.0,0\n"  # latin-1, not UTF-8
        b"3,c@example.com,ok,30.0,1\n"
    )
    report = ingest_items(tmp_path / "utf8", data)
    [bad] = quarantined(report)
    assert bad["reason"] == "csv: not valid utf-8"
    assert json.loads(bad["record"]) == {
        "line": 3,
        "bytes": len(data.split(b"\n")[2]),
        "sha256": hashlib.sha256(data.split(b"\n")[2]).hexdigest(),
    }
    clean = read_dir(report.output_uri)
    assert clean.column("note").to_pylist() == ["café", "ok"]
    assert "\ufffd" not in json.dumps(clean.to_pylist(), ensure_ascii=False)
    assert_accounted(report, clean)

    no_pii = SourceConfig.model_validate({"format": "csv", "uri": "unused", "types": ITEM_TYPES})
    table, _ = read_csv(data, no_pii, b"k")
    record = json.loads(table.column("_record").drop_null()[0].as_py())
    assert record["text"] == "2,b@example.com,caf\\xe9,20.0,0"  # shown as an escape

    latin = data.replace(b"caf\xc3\xa9", b"caf\xe9")
    report = ingest_items(tmp_path / "latin1", latin, encoding="latin-1")
    assert report.rows_quarantined == 0
    assert read_dir(report.output_uri).column("note").to_pylist() == ["café", "café", "ok"]


def test_jsonl_splits_records_on_newline_only(ray_session, tmp_path):
    notes = ["line\u2028separator", "vertical\x0btab", "file\x1cseparator", "next\x85line"]
    rows = [
        {"id": str(i), "email": f"u{i}@example.com", "note": note, "amount": 1.0, "label": 0}
        for i, note in enumerate(notes)
    ]
    raw = [  # control characters written raw, as some producers do (json.dumps escapes them)
        json.dumps(row, ensure_ascii=False).replace("\\u000b", "\x0b").replace("\\u001c", "\x1c")
        for row in rows
    ]
    assert "\x0b" in raw[1] and "\x1c" in raw[2]
    text = "\r\n".join(raw) + "\n\n  \n"
    data = text.encode() + (
        b'{"id": "8", "note": "\\ud800", "amount": 1.0, "label": 0}\n'  # escapes no character
        b'{"id": "9", "note": "\xff", "amount": 1.0, "label": 0}\n'  # not UTF-8
    )
    report = ingest_items(tmp_path, data, "jsonl")
    lines = data.split(b"\n")[:-1]
    assert report.lines == len(lines) == 8
    assert report.blank_lines == blank_count(lines) == 2
    assert report.rows_in == len(lines) - blank_count(lines) == 6
    clean = read_dir(report.output_uri)
    assert clean.column("note").to_pylist() == notes
    bad = {row["reason"]: json.loads(row["record"]) for row in quarantined(report)}
    assert bad.keys() == {"jsonl: invalid unicode escape", "jsonl: not valid utf-8"}
    assert bad["jsonl: invalid unicode escape"]["line"] == 7
    assert bad["jsonl: not valid utf-8"]["line"] == 8
    assert "text" not in bad["jsonl: not valid utf-8"]  # the source has PII: a digest only
    assert_accounted(report, clean)


def test_probe_reads_the_declared_encoding_and_splits_on_newline_only(tmp_path):
    utf16 = tmp_path / "utf16"
    utf16.mkdir()
    (utf16 / "a.csv").write_bytes("id,note\n1,é\n".encode("utf-16"))
    source = SourceConfig.model_validate(
        {"format": "csv", "uri": str(utf16), "encoding": "utf-16", "types": {"id": "string"}}
    )
    assert probe(Storage(), "s", source) == ([str(utf16 / "a.csv")], {})
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    (jsonl / "a.jsonl").write_text('{"id": "1", "note": "a\u2028b"}\n', encoding="utf-8")
    source = SourceConfig.model_validate(
        {"format": "jsonl", "uri": str(jsonl), "types": {"id": "string", "note": "string"}}
    )
    assert probe(Storage(), "s", source) == ([str(jsonl / "a.jsonl")], {})
    # A head that ends inside a multi-byte character and a line: neither is mangled.
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "a.csv").write_bytes(b"id,note\n" + b"1," + "é".encode() * 40_000 + b"\n")
    source = SourceConfig.model_validate(
        {"format": "csv", "uri": str(wide), "types": {"id": "string", "note": "string"}}
    )
    assert probe(Storage(), "s", source)[1] == {}


# --- 5. accounting is checked -------------------------------------------------------------------


def test_accounting_that_does_not_add_up_raises():
    report = SourceReport(name="items", files=1, rows_in=10, lines=10)
    stats = [{"rows": 10, "rows_out": 6, "rows_quarantined": 3, "reasons": {"x: bad": 3}}]
    with pytest.raises(RuntimeError, match="rows in 10 != rows out 6 \\+ quarantined 3"):
        _account(report, stats, text=True)
    fine = SourceReport(name="items", files=1, rows_in=10, lines=11, blank_lines=1)
    stats[0]["rows_out"] = 7
    _account(fine, stats, text=True)
    assert (fine.rows_out, fine.rows_quarantined, fine.reasons) == (7, 3, {"x: bad": 3})


# --- 6. joins never fan out ---------------------------------------------------------------------


def test_join_that_would_repeat_rows_raises():
    facts = pa.table({"customer_id": ["1", "2", "3"], "amount": [1.0, 2.0, 3.0]})
    customers = pa.table({"customer_id": ["1", "2", "2"], "country": ["US", "GB", "FR"]})
    with pytest.raises(SourceError, match="turned 3 rows into 4"):
        join_dimensions(facts, [("customer_id", "customer_", customers)])
    unique = customers.slice(0, 2)
    joined = join_dimensions(facts, [("customer_id", "customer_", unique)])
    assert joined.num_rows == 3
    assert joined.column("customer_country").to_pylist() == ["US", "GB", None]


def test_duplicate_join_keys_in_a_dimension_are_quarantined(ray_session, sample_data, tmp_path):
    rules = [
        {"check": "not_null", "column": "customer_id"},
        {"check": "range", "column": "birth_year", "min": 1900, "max": 2015},
    ]  # no `unique` rule on customer_id
    config = make_config(sample_data, tmp_path, **{"sources.customers.rules": rules})
    result = ingest(config)
    with open(sample_data / "customers" / "customers.csv", newline="") as handle:
        ids = Counter(row["customer_id"] for row in csv.DictReader(handle))
    repeated = sum(count - 1 for count in ids.values())
    assert repeated > 0
    customers = result.sources["customers"]
    assert customers.reasons["customer_id: duplicate join key"] == repeated
    assert (
        Counter(read_dir(customers.output_uri).column("customer_id").to_pylist()).most_common(1)[0][
            1
        ]
        == 1
    )
    transactions = result.sources["transactions"]
    footer_rows = sum(
        pq.read_metadata(f).num_rows for f in (sample_data / "transactions").rglob("*.parquet")
    )
    assert transactions.rows_in == footer_rows
    raw_ids = Counter(
        pa.concat_tables(
            [pq.read_table(f) for f in (sample_data / "transactions").rglob("*.parquet")]
        )
        .column("txn_id")
        .to_pylist()
    )
    assert transactions.reasons["transaction_id: duplicate"] <= sum(
        count - 1 for count in raw_ids.values()
    )
    clean = read_dir(transactions.output_uri)
    assert np.unique(clean.column("transaction_id").to_numpy(zero_copy_only=False)).size == (
        clean.num_rows
    )
    assert_accounted(transactions, clean)


def test_an_empty_text_file_is_set_aside_and_the_run_goes_on(ray_session, tmp_path):
    config = items_config(tmp_path, UNBALANCED)
    (tmp_path / "items" / "empty.csv").write_bytes(b"")
    report = ingest(config).sources["items"]
    assert list(report.bad_files) == [str(tmp_path / "items" / "empty.csv")]
    assert "empty csv file" in report.bad_files[str(tmp_path / "items" / "empty.csv")]
    assert report.rows_in == len(data_lines(UNBALANCED))
    assert_accounted(report, read_dir(report.output_uri))


def test_regression_report_survives_overflowing_values():
    import numpy as np

    from jobs.report import _regression_plots

    assert _regression_plots(np.array([1.0, 2.0, 1e308]), np.array([1.0, -1e308, 2.0])) == []
    assert len(_regression_plots(np.array([1.0, 2.0, 3.0]), np.array([1.1, 2.0, 2.9]))) == 2
