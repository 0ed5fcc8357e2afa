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
from itertools import repeat

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.calibration import Calibration
from jobs.config import Allowed, NotNull, Range
from jobs.featurespec import HISTORY, STATE, enrich, feature_matrix, online_source, transform
from jobs.online_values import (  # noqa: F401  (records_table and _utc_naive: public here)
    EXACT,
    INF,
    NUMBER,
    _convert,
    _Fallback,
    _flag,
    _floats,
    _index,
    _kind,
    _normalize,
    _utc_naive,
    _values,
    records_table,
)
from jobs.registry import Bundle
from jobs.scoring import model_scores


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

    def features(self, records: list[dict], state=None) -> tuple[np.ndarray, list[str | None]]:
        """(n, n_features) float32 matrix in spec.feature_names order, and per-row reason
        (None if valid): bitwise what `enrich` + `transform` + `feature_matrix` give.

        `state(entities, amounts, seconds, null_time, reasons)`, when given, supplies each
        row's prior history and windows from the online state (`jobs.feature_state`) instead
        of the bundle's snapshot; it may be called twice and must not change anything."""
        if self.arrow_only is None:
            try:
                return self._features(records, state)
            except Exception:  # _Fallback, or anything not mirrored: the reference decides
                pass
        enriched, reasons = enrich(
            records_table(records, self.spec), self.spec, self.bundle.lookups
        )
        reasons = reasons.to_pylist()
        if state is not None:
            enriched = with_state(enriched, reasons, self.spec, state)
        matrix = feature_matrix(transform(enriched, self.spec), self.spec.feature_names)
        return matrix, reasons

    def score(self, records: list[dict], state=None) -> tuple[np.ndarray, list[str | None]]:
        """Scores as `jobs.scoring.model_scores` returns them (binary: calibrated (n,),
        multiclass (n, k), regression (n,)); rows with a reason get NaN."""
        matrix, reasons = self.features(records, state)
        return self.scores_for(matrix, reasons), reasons

    def scores_for(self, matrix: np.ndarray, reasons: list[str | None]) -> np.ndarray:
        """The model's scores for a feature matrix from `features` (NaN where a reason is)."""
        scores = model_scores(self.bundle.booster, matrix, self.spec.task, self.calibration)
        invalid = np.array([reason is not None for reason in reasons], dtype=bool)
        mask = invalid.reshape(-1, *([1] * (scores.ndim - 1)))
        return np.where(mask, np.nan, scores)  # as `score_records` (same dtype)

    def _features(self, records: list[dict], state=None) -> tuple[np.ndarray, list[str | None]]:
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
            if self.history and state is not None:
                entity, amount = self.history[:2]
                prior = state(cols[entity], cols[amount], seconds, null_time, reasons)
                nums.update(stated_history(prior, _floats(cols[amount]), seconds, null_time))
            elif self.history:
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


def stated_history(prior: dict, amounts: np.ndarray, seconds, null_time) -> dict:
    """History and window features from per-row prior state (`jobs.feature_state.Step`), by
    `history_from_state`'s formulas."""
    count = prior["count"]
    mean = np.where(count > 0, prior["total"] / count, np.nan)
    gap = np.where(null_time, np.nan, seconds.astype(np.float64)) - prior["last"]
    values = dict(zip(HISTORY, (count, mean, amounts / mean, gap), strict=True))
    return {**values, **prior["windows"]}


def with_state(enriched: pa.Table, reasons: list, spec, state) -> pa.Table:
    """`enrich`'s output with its history (and window) columns from `state` instead of the
    snapshot: `OnlineScorer.features`' Arrow path, and batch inference's."""
    history = spec.features.history
    amounts = pc.cast(enriched.column(history.amount), pa.float64()).to_pylist()
    stamps = enriched.column(spec.features.timestamp)
    stamps = pc.cast(pc.cast(stamps, pa.timestamp("s")), pa.int64())
    null_time = np.array([v is None for v in stamps.to_pylist()], dtype=bool)
    seconds = np.array(pc.fill_null(stamps, 0).to_pylist(), dtype=np.int64)
    entities = enriched.column(history.entity).to_pylist()
    prior = state(entities, amounts, seconds, null_time, reasons)
    with np.errstate(all="ignore"):
        values = stated_history(prior, _floats(amounts), seconds, null_time)
    for name, value in values.items():
        column = pa.array(value, pa.float64())
        if name in enriched.column_names:
            enriched = enriched.set_column(enriched.column_names.index(name), name, column)
        else:
            enriched = enriched.append_column(name, column)
    return enriched
