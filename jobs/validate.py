"""Standardization and validation rules, applied to Arrow batches.

The same functions run on each file's block during ingest, on batch-inference batches and on
single HTTP records in serving, so a record is judged the same way online and offline. Every
failing row gets a reason naming the rule and the column; rows are never dropped here.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.config import Allowed, NotNull, Range, References, SourceConfig
from jobs.errors import SchemaError, SourceError

REASON = "_reason"
RECORD = "_record"
PATH = "path"
ROW = "_row"
# Decimal text only: "nan", "inf", "infinity", "0x1p3" are not numbers here. "1e999" is, and
# overflows to infinity, which `standardize` flags as "not a finite number".
NUMERIC_PATTERN = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
# Integers this short fit int64 exactly and cast directly; others go through float64 and must
# be whole and within 2**53, where a float64 still holds every integer exactly.
INTEGER_PATTERN = r"^\s*-?\d{1,18}\s*$"
EXACT_FLOAT_INTEGER = 2.0**53
ARROW_TYPES = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("s"),
    "date": pa.date32(),
}


def raw_columns(source: SourceConfig) -> dict[str, str]:
    """Standard column -> the raw column it is read from."""
    inverse = {standard: raw for raw, standard in source.rename.items()}
    return {column: inverse.get(column, column) for column in source.types}


def check_schema(names: list[str], source: SourceConfig, source_name: str, where: str) -> None:
    missing = [
        f"{raw!r}" + (f" (-> {standard!r})" if raw != standard else "")
        for standard, raw in raw_columns(source).items()
        if raw not in names
    ]
    if missing:
        raise SchemaError(
            f"source {source_name!r}: column {', '.join(missing)} not found in {where}; "
            f"it has {sorted(names)}"
        )


def add_reason(reasons: pa.Array, failed: pa.Array, reason: str) -> pa.Array:
    """Records `reason` on failing rows that have no earlier reason (first failure wins)."""
    failed = pc.fill_null(failed, False)
    return pc.if_else(pc.and_(pc.is_null(reasons), failed), pa.scalar(reason), reasons)


def _cast(column: pa.ChunkedArray, target: str, formats: list[str]) -> pa.ChunkedArray:
    """Casts leniently: values that cannot be converted become null (the caller flags them)."""
    arrow_type = ARROW_TYPES[target]
    if column.type == arrow_type:
        return column
    if target == "string":
        return pc.cast(column, pa.string())
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        text = pc.utf8_trim_whitespace(column)
        if target in ("timestamp", "date"):
            formats = formats if target == "timestamp" else ["%Y-%m-%d"]
            parsed = [pc.strptime(text, format=f, unit="s", error_is_null=True) for f in formats]
            value = pc.coalesce(*parsed) if len(parsed) > 1 else parsed[0]
            return pc.cast(value, arrow_type)
        if target == "bool":
            lowered = pc.utf8_lower(text)
            valid = pc.is_in(lowered, value_set=pa.array(["true", "false", "1", "0"]))
            return pc.if_else(valid, pc.is_in(lowered, value_set=pa.array(["true", "1"])), None)
        valid = pc.match_substring_regex(text, NUMERIC_PATTERN)
        as_float = pc.cast(pc.if_else(valid, text, None), pa.float64())
        if target == "int64":
            short = pc.match_substring_regex(text, INTEGER_PATTERN)
            exact = pc.cast(pc.if_else(short, text, None), pa.int64())
            return pc.coalesce(exact, _whole_floats(as_float))
        return as_float
    if pa.types.is_floating(column.type) and target == "int64":
        return _whole_floats(pc.cast(column, pa.float64()))
    if pa.types.is_timestamp(column.type) and target == "date":
        return pc.cast(column, pa.date32())
    if pa.types.is_timestamp(column.type):
        return (
            pc.cast(pc.cast(column, pa.timestamp("s", tz=column.type.tz), safe=False), arrow_type)
            if column.type.tz
            else pc.cast(column, arrow_type, safe=False)
        )
    return pc.cast(column, arrow_type, safe=False)


def standardize(table: pa.Table, source: SourceConfig) -> tuple[pa.Table, pa.Array]:
    """Renames, casts, normalizes and converts currency; returns the table and row reasons."""
    reasons = pa.nulls(table.num_rows, pa.string())
    columns = {}
    for standard, raw in raw_columns(source).items():
        original = table.column(raw)
        if pa.types.is_floating(original.type):
            original = nan_to_null(original)
        value = _cast(original, source.types[standard], source.timestamp_formats)
        lost = pc.and_(pc.is_null(value), pc.is_valid(original))
        reasons = add_reason(reasons, lost, f"{standard}: not a valid {source.types[standard]}")
        if source.types[standard] == "float64":
            reasons = _flag_not_finite(reasons, value, standard)
        mode = source.normalize.get(standard)
        if mode:
            value = pc.utf8_trim_whitespace(value)
            if mode == "lower":
                value = pc.utf8_lower(value)
            elif mode == "upper":
                value = pc.utf8_upper(value)
        columns[standard] = value
    result = pa.table(columns)
    if source.currency:
        currency = source.currency
        codes = result.column(currency.code)
        known = pa.array(list(currency.rates))
        rates = pa.array(list(currency.rates.values()), pa.float64())
        rate = pc.take(rates, pc.index_in(codes, value_set=known))
        unknown = pc.and_(pc.is_null(rate), pc.is_valid(codes))
        reasons = add_reason(reasons, unknown, f"{currency.code}: unknown currency")
        converted = pc.multiply(result.column(currency.amount), rate)
        reasons = _flag_not_finite(reasons, converted, currency.output)  # 1e308 * 1.27 = inf
        result = result.append_column(currency.output, converted)
    return result, reasons


def nan_to_null(values: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """NaN in a float column is a missing value: as null, `not_null` catches it, an optional
    column stays null, and no comparison silently passes it (NaN < x and NaN > x are false)."""
    return pc.if_else(pc.is_nan(values), pa.scalar(None, values.type), values)


def _flag_not_finite(reasons: pa.Array, values, column: str) -> pa.Array:
    """Infinity (or a NaN a computation produced) passes range rules; it is never valid data."""
    return add_reason(reasons, pc.invert(pc.is_finite(values)), f"{column}: not a finite number")


def _whole_floats(values: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """int64 from float64 without silent truncation: only whole, finite values within
    2**53 are kept (3.0 -> 3); 3.5, inf and 1e30 become null, which the caller flags."""
    whole = pc.and_(
        pc.equal(values, pc.floor(values)),
        pc.less_equal(pc.abs(values), EXACT_FLOAT_INTEGER),
    )
    return pc.cast(pc.if_else(whole, values, None), pa.int64())


def check_rows(
    table: pa.Table,
    source: SourceConfig,
    reasons: pa.Array,
    reference_keys: dict[str, pa.Array] | None = None,
) -> pa.Array:
    """Row-level rules: not_null, range, allowed, references (uniqueness is global, in ingest)."""
    for rule in source.rules:
        column = table.column(rule.column)
        if isinstance(rule, NotNull):
            reasons = add_reason(reasons, pc.is_null(column), f"{rule.column}: is null")
        elif isinstance(rule, Range):
            if rule.min is not None:
                reasons = add_reason(
                    reasons, pc.less(column, rule.min), f"{rule.column}: below {rule.min}"
                )
            if rule.max is not None:
                reasons = add_reason(
                    reasons, pc.greater(column, rule.max), f"{rule.column}: above {rule.max}"
                )
        elif isinstance(rule, Allowed):
            outside = pc.invert(pc.is_in(column, value_set=pa.array(rule.values)))
            reasons = add_reason(
                reasons, pc.and_(outside, pc.is_valid(column)), f"{rule.column}: not allowed"
            )
        elif isinstance(rule, References) and reference_keys is not None:
            orphan = pc.invert(pc.is_in(column, value_set=reference_keys[rule.source]))
            reasons = add_reason(
                reasons,
                pc.and_(orphan, pc.is_valid(column)),
                f"{rule.column}: no such {rule.source} key",
            )
    return reasons


def keyed_hash(values: pa.ChunkedArray | pa.Array, key: bytes) -> pa.Array:
    """HMAC-SHA256 (truncated) of each value: joinable, not reversible without the key."""
    return pa.array(
        [
            None
            if value is None
            else hmac.new(key, str(value).encode(), hashlib.sha256).hexdigest()[:32]
            for value in values.to_pylist()
        ],
        pa.string(),
    )


def apply_pii(table: pa.Table, pii: dict[str, str], key: bytes) -> pa.Table:
    for column, action in pii.items():
        if column not in table.column_names:
            continue
        index = table.column_names.index(column)
        if action == "drop":
            table = table.remove_column(index)
        else:
            table = table.set_column(index, column, keyed_hash(table.column(column), key))
    return table


def redact_record(row: dict, pii: dict[str, str], key: bytes, rename: dict[str, str]) -> str:
    """A quarantined row as JSON with its PII hashed or dropped (by raw or standard name)."""
    for column, action in pii.items():
        for name in {column, *(raw for raw, standard in rename.items() if standard == column)}:
            if name not in row:
                continue
            if action == "drop":
                row.pop(name)
            elif row[name] is not None:
                row[name] = hmac.new(key, str(row[name]).encode(), hashlib.sha256).hexdigest()[:32]
    return json.dumps(row, default=str)


def unparseable_record(line: str | bytes, number: int) -> str:
    """A line that cannot be parsed may hold PII anywhere: keep only where it was and its digest.

    Bytes are hashed as they are (a line that is not valid text), text as UTF-8.
    """
    raw = line if isinstance(line, bytes) else line.encode()
    digest = hashlib.sha256(raw).hexdigest()
    return json.dumps({"line": number, "bytes": len(raw), "sha256": digest})


def quarantine_records(
    raw: pa.Table, reasons: pa.Array, pii: dict[str, str], key: bytes, rename: dict[str, str]
) -> pa.Array:
    """The raw row as JSON for each failing row (PII already hashed or dropped), else null."""
    failing = np.flatnonzero(pc.is_valid(reasons).to_numpy(zero_copy_only=False))
    records: list[str | None] = [None] * raw.num_rows
    for index, row in zip(failing, raw.take(pa.array(failing)).to_pylist(), strict=True):
        records[index] = redact_record(row, pii, key, rename)
    return pa.array(records, pa.string())


def join_dimensions(table: pa.Table, dimensions: list[tuple[str, str, pa.Table]]) -> pa.Table:
    """Left-joins dimension tables (key, column prefix, table); used in ingest and in serving.

    A dimension key that appears twice would repeat the fact rows that match it and inflate
    every count downstream; ingest quarantines such keys, and this raises if one gets through.
    """
    if not dimensions:
        return table
    table = table.append_column(ROW, pa.array(np.arange(table.num_rows)))
    for key_column, prefix, dimension in dimensions:
        renamed = dimension.rename_columns(
            [c if c == key_column else prefix + c for c in dimension.column_names]
        )
        rows = table.num_rows
        table = table.join(renamed, keys=key_column, join_type="left outer")
        if table.num_rows != rows:
            raise SourceError(_fan_out_message(dimension, key_column, prefix, rows, table))
    return table.sort_by(ROW).drop_columns([ROW])  # Arrow's hash join does not keep row order


def _fan_out_message(dimension: pa.Table, key: str, prefix: str, rows: int, joined) -> str:
    counts = dimension.group_by(key).aggregate([([], "count_all")])
    repeated = pc.sum(pc.greater(counts.column("count_all"), 1)).as_py()
    return (
        f"join on {key!r} (columns {prefix}*) turned {rows} rows into {joined.num_rows}: "
        f"{repeated} key(s) appear more than once in the joined table"
    )
