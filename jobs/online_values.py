"""Value conversions of the compiled online path (`jobs.online`), each mirroring what Arrow does
in `records_table` + `standardize`, or raising `_Fallback` where it cannot mirror it exactly."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from types import NoneType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.featurespec import online_source
from jobs.validate import ARROW_TYPES

EPOCH = datetime(1970, 1, 1)
EPOCH_DAY = date(1970, 1, 1).toordinal()
SECOND = timedelta(seconds=1)
EXACT = 2**53  # Arrow refuses to cast larger ints to float64; the Arrow path raises on them
NUMBER = ("int64", "float64")
KINDS = {"int64": int, "bool": bool, "timestamp": datetime, "date": date}
INF = float("inf")


class _Fallback(Exception):
    """This batch needs the Arrow path (it raises, or does something not mirrored here)."""


def records_table(records: list[dict], spec) -> pa.Table:
    """Records as the Arrow table the batch path takes (what serving builds for it)."""
    source = online_source(spec.source, spec.features.label)
    columns = {}
    for column, kind in source.types.items():
        values = [record.get(column) for record in records]
        if kind == "string":
            values = [None if v is None else str(v) for v in values]
        elif kind == "timestamp":
            values = [_utc_naive(v) for v in values]
        columns[column] = pa.array(values, ARROW_TYPES[kind])
    return pa.table(columns)


def _utc_naive(value: datetime | None) -> datetime | None:
    """Timestamps are stored as naive UTC; convert aware ones, keep naive ones as they are."""
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


def _kind(arrow_type: pa.DataType) -> str | None:
    """The source type an Arrow column behaves as, or None for one not compiled here."""
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    if pa.types.is_timestamp(arrow_type) and arrow_type.tz is None:
        return "timestamp"
    named = {pa.int64(): "int64", pa.float64(): "float64", pa.bool_(): "bool", pa.date32(): "date"}
    return named.get(arrow_type)


def _values(column: pa.ChunkedArray, kind: str) -> list:
    """Python values as the compiled path holds them: timestamps in epoch seconds (Arrow's
    safe cast to seconds, which raises on a sub-second value), dates in epoch days."""
    if kind == "timestamp":
        return pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64()).to_pylist()
    if kind == "date":
        return pc.cast(column, pa.int32()).to_pylist()
    values = column.to_pylist()
    if kind == "int64" and any(v is not None and abs(v) > EXACT for v in values):
        raise ValueError("an int64 beyond 2**53")
    return values


def _floats(values: list) -> np.ndarray:
    """float64 with NaN for null: enough for values that only feed imputation."""
    return np.array(values, dtype=np.float64)


def _flag(reasons: list, failing, reason: str) -> None:
    for i in failing:  # the first failing rule wins, as in `jobs.validate.add_reason`
        if reasons[i] is None:
            reasons[i] = reason


def _convert(values: list, kind: str) -> list:
    """Request values as `records_table` + `standardize` leave them (NaN becomes null).

    Type checks go through `set(map(type, ...))`, in C, so a batch costs little per record."""
    types = set(map(type, values)) - {NoneType}
    if kind == "string":
        out = values if types <= {str} else [None if v is None else str(v) for v in values]
        if not "".join(filter(None, out)).isascii():
            for v in out:
                try:
                    v is None or v.encode()
                except UnicodeEncodeError:  # Arrow cannot hold it: the batch path raises
                    raise _Fallback from None
        return out
    if kind == "float64":
        if types <= {float}:
            return [None if v != v else v for v in values]  # NaN != NaN; None != None is False
        if not types <= {float, int} or any(type(v) is int and abs(v) > EXACT for v in values):
            raise _Fallback  # Arrow refuses an int it cannot hold exactly as a float64
        return [None if v is None or v != v else float(v) for v in values]
    if not types <= {KINDS[kind]}:
        raise _Fallback  # e.g. a bool for an int or a datetime subclass: Arrow may differ
    if kind == "int64" and any(v is not None and abs(v) > EXACT for v in values):
        raise _Fallback  # Arrow raises where it casts such an int to float64
    if kind == "timestamp":  # Arrow drops the microseconds: floor to the second
        return [
            None if v is None else ((v if v.tzinfo is None else _utc_naive(v)) - EPOCH) // SECOND
            for v in values
        ]
    if kind == "date":
        return [None if v is None else v.toordinal() - EPOCH_DAY for v in values]
    return values


def _normalize(values: list, mode: str) -> list:
    """utf8_trim_whitespace + utf8_lower/upper, once per distinct value: Python's strip and
    case mapping agree with Arrow's on ASCII (the whitespace sets are equal, all of Unicode);
    other text goes through Arrow."""
    case = {"lower": str.lower, "upper": str.upper}.get(mode, str)
    distinct = set(values) - {None}
    mapping = {v: case(v.strip()) for v in distinct if v.isascii()}
    odd = [v for v in distinct if v not in mapping]
    if odd:
        text = pc.utf8_trim_whitespace(pa.array(odd, pa.string()))
        if mode in ("lower", "upper"):
            text = pc.utf8_lower(text) if mode == "lower" else pc.utf8_upper(text)
        mapping.update(zip(odd, text.to_pylist(), strict=True))
    return list(map(mapping.get, values))


def _index(keys: list, values: list) -> tuple[dict, set]:
    """key -> value, and the keys that appear twice (the batch join raises on those)."""
    index = {k: v for k, v in zip(keys, values, strict=True) if k is not None}
    repeated = set()
    if len(index) < sum(k is not None for k in keys):
        seen = set()
        repeated = {k for k in keys if k is not None and (k in seen or seen.add(k))}
    return index, repeated
