"""The compiled online scoring path: HTTP records -> the batch path's features and scores.

`jobs.predict.score_records` stays the reference; it costs milliseconds per call in Arrow setup
(casts, hash joins, sorts) whatever the batch size. `OnlineScorer` does the same work once per
bundle where it can (lookups as dicts, rules and medians as plain values) and per request in
plain Python and numpy, reproducing Arrow's semantics value for value: the float32 matrix is
bitwise equal, so the scores are too, and every row gets the same reason string.

Where Arrow and Python disagree the compiled path steps aside rather than guess: a batch with a
value it cannot mirror exactly (an int beyond 2**53, which Arrow refuses to cast; a datetime
subclass; a string that is not valid UTF-8; a join key that appears twice in a lookup, which
the batch path reports as an error; any error at all) goes through the Arrow path, and so does
every batch of a bundle whose spec uses a combination not compiled here (`arrow_only` says why).
"""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta, timezone
from itertools import repeat
from types import NoneType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.calibration import Calibration
from jobs.config import Allowed, NotNull, Range
from jobs.featurespec import HISTORY, STATE, enrich, feature_matrix, online_source, transform
from jobs.registry import Bundle
from jobs.scoring import model_scores
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


class OnlineScorer:
    """Compiled once per bundle: lookups as dicts, rules, medians and categories as plain
    values; per request only Python over the records and numpy over the columns."""

    def __init__(self, bundle: Bundle):
        self.bundle, self.spec = bundle, bundle.spec
        calibration = bundle.calibration
        # Validated once: `calibrate` would parse the dict again on every call.
        self.calibration = None if calibration is None else Calibration.model_validate(calibration)
        self.arrow_only: str | None = None
        try:
            self._compile()
        except (ValueError, KeyError, pa.ArrowException) as error:
            self.arrow_only = str(error)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> OnlineScorer:
        return cls(bundle)

    def _compile(self) -> None:
        spec, features = self.spec, self.spec.features
        source = online_source(spec.source, features.label)
        kinds = dict(source.types)
        self.columns = list(kinds.items())
        self.names = list(kinds)
        # `standardize` normalizes only the typed columns (the label is not one online)
        self.normalize = {c: mode for c, mode in source.normalize.items() if c in kinds}
        if any(kinds[c] != "string" for c in self.normalize):
            raise ValueError("normalize on a column that is not a string")
        self.currency = source.currency
        if self.currency:
            c = self.currency
            if kinds[c.amount] not in NUMBER or kinds[c.code] != "string":
                raise ValueError("currency columns of unexpected types")
            kinds[c.output] = "float64"
        self.rules = []
        for rule in source.rules:
            kind = kinds[rule.column]
            if isinstance(rule, NotNull):
                checks = [("null", None, "is null")]
            elif isinstance(rule, Range) and kind in NUMBER:
                bounds = (("min", rule.min, "below"), ("max", rule.max, "above"))
                checks = [(op, b, f"{word} {b}") for op, b, word in bounds if b is not None]
            elif isinstance(rule, Allowed) and kind == "string":
                checks = [("in", set(rule.values), "not allowed")]
            else:
                raise ValueError(f"rule {rule.check} on a {kind} column is not compiled")
            self.rules += [(op, rule.column, b, f"{rule.column}: {text}") for op, b, text in checks]
        used = {*features.numeric, *features.categorical, features.timestamp}
        used |= {c for d in features.derived.values() for c in d.columns}
        if features.history:
            used |= {features.history.entity, features.history.amount}
        self.joins = []
        for join in spec.joins:
            table = self.bundle.lookups[join.source]
            key_kind = _kind(table.schema.field(join.key).type)
            if key_kind not in ("string", "int64") or key_kind != kinds[join.key]:
                raise ValueError(f"join key {join.key!r} types differ or are not compiled")
            keys, fields = table.column(join.key).to_pylist(), []
            added = [join.prefix + name for name in table.column_names if name != join.key]
            if any(name in kinds for name in added):
                raise ValueError(f"a column of lookup {join.source!r} clashes with another")
            for name in table.column_names:
                if name != join.key and join.prefix + name in used:
                    kind = _kind(table.schema.field(name).type)
                    if kind is None:
                        raise ValueError(f"joined column {join.prefix + name!r} is not compiled")
                    kinds[join.prefix + name] = kind
                    index = _index(keys, _values(table.column(name), kind))[0]
                    fields.append((join.prefix + name, index))
            self.joins.append((join.key, _index(keys, keys)[1], fields))
        self.history = None
        if features.history:
            entity, amount = features.history.entity, features.history.amount
            state = self.bundle.lookups["history"]
            state_kinds = [_kind(state.schema.field(c).type) for c in (entity, *STATE)]
            if state_kinds != [kinds[entity], "int64", "float64", "timestamp"]:
                raise ValueError("history state of unexpected types")
            if kinds[amount] not in (*NUMBER, "bool") or kinds[entity] not in ("string", "int64"):
                raise ValueError("history columns of unexpected types")
            keys = state.column(entity).to_pylist()
            count, total, last = (
                [None if v is None else float(v) for v in _values(state.column(c), k)]
                for c, k in zip(STATE, state_kinds[1:], strict=True)
            )
            count = [0.0 if v is None else v for v in count]  # fill_null(count, 0)
            indexes = [_index(keys, values)[0] for values in (count, total, last)]
            self.history = (entity, amount, _index(keys, keys)[1], *indexes)
        self.timestamp = features.timestamp
        if self.timestamp and kinds[self.timestamp] not in ("timestamp", "date"):
            raise ValueError("features.timestamp is not a timestamp or date")
        self.derived = []
        for name, derived in features.derived.items():
            first, last = kinds[derived.columns[0]], kinds[derived.columns[-1]]
            allowed = {
                "years_since_year": (*NUMBER, "bool"),
                "days_since": ("timestamp", "date"),
                "not_equal": (last,),  # the same type on both sides, as Arrow compares them
            }[derived.kind]
            if first not in allowed:
                raise ValueError(f"derived feature {name!r} on columns of unexpected types")
            self.derived.append((name, derived.kind, derived.columns))
        computed = {*features.derived, *features.time_features, *(HISTORY if self.history else [])}
        position = {name: i for i, name in enumerate(spec.feature_names)}
        self.numeric = [*features.numeric, *features.time_features]
        for name in self.numeric:
            if name not in computed and kinds[name] not in (*NUMBER, "bool"):
                raise ValueError(f"numeric feature {name!r} is not a number")
        self.numeric_positions = [position[name] for name in self.numeric]
        self.medians = np.array([[spec.medians.get(name, 0.0)] for name in self.numeric])
        self.logs = [i for i, name in enumerate(self.numeric) if name in features.log_transform]
        self.categorical = []
        for name in features.categorical:
            if name in computed or kinds[name] not in ("string", "int64", "bool"):
                raise ValueError(f"categorical feature {name!r} of an unexpected type")
            index = {}
            for i, value in enumerate(spec.categories[name]):
                index.setdefault(value, i)  # index_in finds the first match
            known = len(spec.categories[name])
            self.categorical.append((position[name], name, kinds[name], index, known))
        self.kinds = kinds

    def features(self, records: list[dict]) -> tuple[np.ndarray, list[str | None]]:
        """(n, n_features) float32 matrix in spec.feature_names order, and per-row reason
        (None if valid): bitwise what `enrich` + `transform` + `feature_matrix` give."""
        if self.arrow_only is None:
            try:
                return self._features(records)
            except Exception:  # _Fallback, or anything not mirrored: the reference decides
                pass
        enriched, reasons = enrich(
            records_table(records, self.spec), self.spec, self.bundle.lookups
        )
        matrix = feature_matrix(transform(enriched, self.spec), self.spec.feature_names)
        return matrix, reasons.to_pylist()

    def score(self, records: list[dict]) -> tuple[np.ndarray, list[str | None]]:
        """Scores as `jobs.scoring.model_scores` returns them (binary: calibrated (n,),
        multiclass (n, k), regression (n,)); rows with a reason get NaN."""
        matrix, reasons = self.features(records)
        return self.scores_for(matrix, reasons), reasons

    def scores_for(self, matrix: np.ndarray, reasons: list[str | None]) -> np.ndarray:
        """The model's scores for a feature matrix from `features` (NaN where a reason is)."""
        scores = model_scores(self.bundle.booster, matrix, self.spec.task, self.calibration)
        invalid = np.array([reason is not None for reason in reasons], dtype=bool)
        mask = invalid.reshape(-1, *([1] * (scores.ndim - 1)))
        return np.where(mask, np.nan, scores)  # as `score_records` (same dtype)

    def _features(self, records: list[dict]) -> tuple[np.ndarray, list[str | None]]:
        n = len(records)
        cols, reasons = {}, [None] * n
        rows = [tuple(map(r.get, self.names)) for r in records]
        columns = zip(*rows, strict=True) if rows else [()] * len(self.names)
        for (name, kind), values in zip(self.columns, columns, strict=True):
            values = _convert(list(values), kind)  # standardize: types, finiteness, case
            if kind == "float64" and (INF in values or -INF in values):
                bad = [i for i, v in enumerate(values) if v is not None and math.isinf(v)]
                _flag(reasons, bad, f"{name}: not a finite number")
            mode = self.normalize.get(name)
            cols[name] = _normalize(values, mode) if mode else values
        if self.currency:
            c = self.currency
            rates = list(map(c.rates.get, cols[c.code]))
            if None in rates:
                codes = cols[c.code]
                unknown = [i for i, r in enumerate(rates) if r is None and codes[i] is not None]
                _flag(reasons, unknown, f"{c.code}: unknown currency")
            converted = [
                None if a is None or r is None else a * r
                for a, r in zip(cols[c.amount], rates, strict=True)
            ]
            bad = [i for i, v in enumerate(converted) if v is not None and not math.isfinite(v)]
            _flag(reasons, bad, f"{c.output}: not a finite number")
            cols[c.output] = converted
        for check, column, bound, reason in self.rules:  # check_rows, in the rules' order
            values = cols[column]
            if check == "null":
                bad = [i for i, v in enumerate(values) if v is None] if None in values else ()
            elif check == "min":
                bad = [i for i, v in enumerate(values) if v is not None and v < bound]
            elif check == "max":
                bad = [i for i, v in enumerate(values) if v is not None and v > bound]
            else:
                bad = [i for i, v in enumerate(values) if v is not None and v not in bound]
            _flag(reasons, bad, reason)
        for key, repeated, fields in self.joins:  # join_dimensions: left joins
            keys = cols[key]
            if repeated and not repeated.isdisjoint(keys):
                raise _Fallback  # the batch path raises on a key that would repeat rows
            for name, index in fields:
                cols[name] = list(map(index.get, keys))
        nums = {}
        seconds = null_time = None
        if self.timestamp:
            stamps = cols[self.timestamp]
            scale = 86400 if self.kinds[self.timestamp] == "date" else 1
            null_time = np.array([s is None for s in stamps], dtype=bool)
            seconds = np.array([0 if s is None else s * scale for s in stamps], dtype=np.int64)
        with np.errstate(all="ignore"):  # IEEE results (inf, NaN) as Arrow's, no warnings
            if self.history:
                nums.update(self._history(cols, seconds, null_time))
            for name, kind, columns in self.derived:
                nums[name] = self._derive(cols, kind, columns, seconds, null_time)
            for name in self.spec.features.time_features:
                value = (seconds % 86400) // 3600 if name == "hour" else (seconds // 86400 + 3) % 7
                nums[name] = np.where(null_time, np.nan, value.astype(np.float64))
            return self._matrix(n, cols, nums), reasons

    def _history(self, cols: dict, seconds: np.ndarray, null_time: np.ndarray) -> dict:
        """`history_from_state`: count, prior mean, amount / mean and seconds since the last."""
        entity, amount, repeated, count, total, last = self.history
        entities = cols[entity]
        if repeated and not repeated.isdisjoint(entities):
            raise _Fallback
        count = np.fromiter(map(count.get, entities, repeat(0.0)), np.float64, len(entities))
        mean = np.where(count > 0, _floats(list(map(total.get, entities))) / count, np.nan)
        ratio = _floats(cols[amount]) / mean
        gap = np.where(null_time, np.nan, seconds.astype(np.float64))
        gap = gap - _floats(list(map(last.get, entities)))
        return dict(zip(HISTORY, (count, mean, ratio, gap), strict=True))

    def _derive(self, cols, kind, columns, seconds, null_time) -> np.ndarray:
        """`derive`: relative to each event's own timestamp, NaN where Arrow gives null."""
        first = cols[columns[0]]
        if kind == "years_since_year":
            years = seconds.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64)
            value = (years + 1970).astype(np.float64) - _floats(first)
        elif kind == "days_since":
            scale = 86400 if self.kinds[columns[0]] == "date" else 1
            start = np.array([0 if v is None else v * scale for v in first], dtype=np.int64)
            value = (seconds - start).astype(np.float64) / 86400.0
            value[[v is None for v in first]] = np.nan
        else:
            pairs = zip(first, cols[columns[1]], strict=True)
            return _floats([None if a is None or b is None else float(a != b) for a, b in pairs])
        return np.where(null_time, np.nan, value)

    def _matrix(self, n: int, cols: dict, nums: dict) -> np.ndarray:
        """`transform` + `feature_matrix`: impute, log1p, encode, cast to float32 last."""
        matrix = np.empty((n, len(self.spec.feature_names)), dtype=np.float32)
        values = np.empty((len(self.numeric), n))  # one row per numeric feature
        for row, name in enumerate(self.numeric):
            values[row] = nums[name] if name in nums else _floats(cols[name])
        values = np.where(np.isnan(values), self.medians, values)
        if self.logs:  # math.log1p is libm's, as Arrow's; numpy's SIMD log1p differs in ulps
            logged = np.maximum(values[self.logs], 0.0) + 0.0  # Arrow's max(-0.0, 0) is +0.0
            flat = np.fromiter(map(math.log1p, logged.ravel().tolist()), np.float64, logged.size)
            values[self.logs] = flat.reshape(logged.shape)
        matrix[:, self.numeric_positions] = values.T
        for position, name, kind, index, known in self.categorical:
            values = cols[name]
            if kind == "int64":
                values = [None if v is None else str(v) for v in values]
            elif kind == "bool":
                values = [None if v is None else "true" if v else "false" for v in values]
            matrix[:, position] = list(map(index.get, values, repeat(known, n)))
        return matrix
