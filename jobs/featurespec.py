"""The FeatureSpec and the functions that apply it, shared by batch and online paths.

The FeatureSpec is JSON (no pickle). `enrich` turns raw records into joined, history and
derived columns, `transform` turns those into model inputs; Ray tasks in `jobs.features`, the
HTTP endpoint and batch inference all call them, so scores agree. History features come from
strictly earlier events: point-in-time over whole entities in batch, from the stored
per-entity state (count, amount sum, last event) online.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from jobs import validate
from jobs.config import FeaturesConfig, JoinConfig, SourceConfig
from jobs.config_checks import HISTORY_FEATURES

HISTORY = HISTORY_FEATURES
ROW_KEY = "_row_key"  # stands in for the primary key of a fact source that declares none
STATE = ["state_count", "state_amount_sum", "state_last_ts"]
SPLIT = "split"


class FeatureSpec(BaseModel):
    """Everything needed to turn a raw record into model input, fitted on the train split."""

    model_config = ConfigDict(extra="forbid")

    version: int = 2
    task: str = "binary"
    classes: list[str] = Field(default_factory=lambda: ["0", "1"], description="index -> name")
    source: SourceConfig
    joins: list[JoinConfig]
    features: FeaturesConfig
    medians: dict[str, float]
    categories: dict[str, list[str]]
    feature_names: list[str]


def class_names(features: FeaturesConfig, task: str) -> list[str]:
    """Class index -> name: the mapping's names, or "0"/"1" for a numeric binary label."""
    if task == "regression":
        return []
    mapping = features.label_map
    if mapping is None:
        return ["0", "1"]
    if mapping.classes is not None:
        return list(mapping.classes)
    names: dict[int, str] = {}
    for value, index in mapping.mapping().items():
        names.setdefault(index, value)
    return [names[index] for index in sorted(names)]


def encode_label(table: pa.Table, features: FeaturesConfig, task: str) -> pa.Table:
    """The label as model targets: class indices (int64) or a float for regression.

    Ingest already quarantined null and unknown labels, so every value maps here; with only
    `positive` declared, any other value is the negative class.
    """
    column = table.column(features.label)
    if task == "regression":
        value = pc.cast(column, pa.float64())
    elif features.label_map is None:
        value = pc.cast(pc.cast(column, pa.int64()), pa.int64())
    else:
        mapping = features.label_map.mapping()
        text = pc.utf8_lower(pc.utf8_trim_whitespace(pc.cast(column, pa.string())))
        index = pc.index_in(text, value_set=pa.array(list(mapping), pa.string()))
        codes = pc.take(pa.array(list(mapping.values()), pa.int64()), index)
        value = pc.fill_null(codes, 0) if features.label_map.negative is None else codes
    position = table.column_names.index(features.label)
    return table.set_column(position, features.label, value)


def row_key(table: pa.Table, source: SourceConfig) -> pa.Table:
    """Adds a stable key from the row's content when the fact source declares no primary key."""
    if source.primary_key or ROW_KEY in table.column_names:
        return table
    hashed = pl.from_arrow(table).hash_rows(seed=0).to_numpy()
    return table.append_column(ROW_KEY, pa.array([f"{h:016x}" for h in hashed], pa.string()))


def _epoch_seconds(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    return pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64())


def _seconds(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return _epoch_seconds(column).to_numpy(zero_copy_only=False)


def history_point_in_time(table: pa.Table, features: FeaturesConfig, tiebreak: str) -> pa.Table:
    """History features from strictly earlier events of the same entity (needs whole entities).

    Events are ordered by (entity, timestamp, tiebreak); polars' sort and windowed cumulative
    sums measured 4x faster here than pandas.factorize + numpy.lexsort on string keys.
    """
    history = features.history
    frame = pl.DataFrame(
        {
            "entity": pl.Series(table.column(history.entity)),
            "seconds": _seconds(table.column(features.timestamp)),
            "tie": pl.Series(table.column(tiebreak)),
            "amount": pl.Series(pc.cast(table.column(history.amount), pa.float64())),
        }
    ).with_row_index("row")
    count = pl.int_range(pl.len()).over("entity").cast(pl.Float64)
    # The running sum of earlier amounts, added one event at a time as the online state adds
    # them (a null amount adds 0), so both give the same float bits.
    prior_sum = pl.col("amount").fill_null(0.0).cum_sum().shift(1).over("entity")
    mean = pl.when(count > 0).then(prior_sum / count)
    ordered = frame.sort(["entity", "seconds", "tie"])
    result = ordered.select(
        "row",
        count.alias(HISTORY[0]),
        mean.alias(HISTORY[1]),
        (pl.col("amount") / mean).alias(HISTORY[2]),
        pl.col("seconds").diff().over("entity").cast(pl.Float64).alias(HISTORY[3]),
    )
    windows = window_point_in_time(ordered, features.windows)
    result = result.with_columns(pl.Series(name, values) for name, values in windows.items())
    result = result.sort("row").fill_nan(None)
    for name in [*HISTORY, *features.windows]:
        table = table.append_column(name, result[name].to_arrow())
    return table


def window_value(agg: str, amounts: list[float]) -> float:
    """One window aggregate; `math.fsum` is exactly rounded, so batch and online agree bitwise
    whatever order the events were added in."""
    if agg == "count":
        return float(len(amounts))
    total = math.fsum(amounts)
    if agg == "sum":
        return total
    return total / len(amounts) if amounts else math.nan


def window_start(kind: str, seconds: int, size: int) -> int:
    """The earliest event time a window at `seconds` covers (sliding: exclusive)."""
    return seconds - size if kind == "sliding" else seconds // size * size


def window_point_in_time(ordered: pl.DataFrame, windows: dict) -> dict[str, np.ndarray]:
    """Window features over each event's strictly earlier events of the same entity, for rows
    sorted by (entity, seconds, tiebreak); NaN where the event time is null."""
    if not windows or ordered.height == 0:
        return {name: np.empty(0) for name in windows} if ordered.height == 0 else {}
    nulls = ordered["seconds"].is_null().to_numpy()
    seconds = ordered["seconds"].fill_null(ordered["seconds"].min() or 0).to_numpy()
    first = (ordered["entity"] != ordered["entity"].shift(1)).fill_null(True)
    code = first.cum_sum().to_numpy().astype(np.int64)
    composite = code * 2**34 + (seconds - seconds.min())  # entity first, then time
    amounts = ordered["amount"].fill_null(0.0).to_list()
    rows = np.arange(ordered.height)
    values = {}
    for name, window in windows.items():
        start = np.array([window_start(window.kind, int(s), window.seconds) for s in seconds])
        side = "right" if window.kind == "sliding" else "left"
        low = np.minimum(np.searchsorted(composite, composite - (seconds - start), side), rows)
        column = [window_value(window.agg, amounts[lo:i]) for lo, i in zip(low, rows, strict=True)]
        values[name] = np.where(nulls, np.nan, np.array(column, dtype=np.float64))
    return values


def history_state(table: pa.Table, features: FeaturesConfig) -> pa.Table:
    """Per-entity state after all events in `table`: what the online path joins on."""
    history = features.history
    grouped = (
        pa.table(
            {
                history.entity: table.column(history.entity),
                "amount": pc.cast(table.column(history.amount), pa.float64()),
                "ts": pc.cast(table.column(features.timestamp), pa.timestamp("s")),
            }
        )
        .group_by(history.entity)
        .aggregate([([], "count_all"), ("amount", "sum"), ("ts", "max")])
    )
    names = {"count_all": STATE[0], "amount_sum": STATE[1], "ts_max": STATE[2]}
    return grouped.rename_columns([names.get(c, c) for c in grouped.column_names]).select(
        [history.entity, *STATE]
    )


def history_from_state(records: pa.Table, state: pa.Table, features: FeaturesConfig) -> pa.Table:
    """History features for new events from the stored state (same definitions as batch)."""
    history = features.history
    joined = validate.join_dimensions(records, [(history.entity, "", state)])
    count = pc.fill_null(pc.cast(joined.column("state_count"), pa.float64()), 0.0)
    has_prior = pc.greater(count, 0)
    mean = pc.if_else(has_prior, pc.divide(joined.column("state_amount_sum"), count), None)
    amount = pc.cast(joined.column(history.amount), pa.float64())
    gap = pc.subtract(
        pc.cast(_epoch_seconds(joined.column(features.timestamp)), pa.float64()),
        pc.cast(_epoch_seconds(joined.column("state_last_ts")), pa.float64()),
    )
    values = (count, mean, pc.divide(amount, mean), gap)
    joined = joined.drop_columns(STATE)
    for name, value in zip(HISTORY, values, strict=True):
        joined = joined.append_column(name, pc.cast(value, pa.float64()))
    return joined


def derive(table: pa.Table, features: FeaturesConfig) -> pa.Table:
    """Derived and time features, relative to each event's own timestamp."""
    timestamp = (
        pc.cast(table.column(features.timestamp), pa.timestamp("s")) if features.timestamp else None
    )
    for name, spec in features.derived.items():
        first = table.column(spec.columns[0])
        if spec.kind == "years_since_year":
            value = pc.subtract(
                pc.cast(pc.year(timestamp), pa.float64()), pc.cast(first, pa.float64())
            )
        elif spec.kind == "days_since":
            start = pc.cast(pc.cast(first, pa.timestamp("s")), pa.int64())
            value = pc.divide(pc.subtract(pc.cast(timestamp, pa.int64()), start), 86400.0)
        else:
            value = pc.cast(pc.not_equal(first, table.column(spec.columns[1])), pa.float64())
        table = table.append_column(name, pc.cast(value, pa.float64()))
    for name in features.time_features:
        value = pc.hour(timestamp) if name == "hour" else pc.day_of_week(timestamp)
        table = table.append_column(name, pc.cast(value, pa.float64()))
    return table


def feature_names(features: FeaturesConfig) -> list[str]:
    return [*features.numeric, *features.time_features, *features.categorical]


def feature_matrix(table: pa.Table, names: list[str]) -> np.ndarray:
    """Model inputs as a float32 matrix in the spec's feature order."""
    return np.column_stack(
        [table.column(name).to_numpy(zero_copy_only=False) for name in names]
    ).astype(np.float32, copy=False)


def transform(table: pa.Table, spec: FeatureSpec) -> pa.Table:
    """Imputes, log-transforms and encodes into float32 model inputs.

    The primary key, label and split pass through when present, so every row of a split can be
    traced back to its source row.
    """
    features = spec.features
    columns = {}
    for name in [*features.numeric, *features.time_features]:
        value = pc.cast(table.column(name), pa.float64())
        value = pc.fill_null(pc.if_else(pc.is_nan(value), None, value), spec.medians.get(name, 0.0))
        if name in features.log_transform:
            value = pc.log1p(pc.max_element_wise(value, 0.0))
        columns[name] = pc.cast(value, pa.float32())
    for name in features.categorical:
        known = pa.array(spec.categories[name], pa.string())
        index = pc.index_in(pc.cast(table.column(name), pa.string()), value_set=known)
        columns[name] = pc.cast(pc.fill_null(index, len(known)), pa.float32())
    result = pa.table(columns)
    for extra in (spec.source.primary_key or ROW_KEY, features.label, SPLIT):
        if extra in table.column_names:
            result = result.append_column(extra, table.column(extra))
    return result


def online_source(source: SourceConfig, label: str, raw_names: bool = False) -> SourceConfig:
    """The fact source for scoring: no label, row rules only; HTTP records use standard names."""
    return source.model_copy(
        update={
            "rename": source.rename if raw_names else {},
            "types": {k: v for k, v in source.types.items() if k != label},
            "rules": [
                r
                for r in source.rules
                if r.check not in ("unique", "references") and r.column != label
            ],
        }
    )


def enrich(
    records: pa.Table, spec: FeatureSpec, lookups: dict[str, pa.Table], raw_names: bool = False
) -> tuple[pa.Table, pa.Array]:
    """Raw records -> standardized, joined, history and derived columns; plus row reasons."""
    source = online_source(spec.source, spec.features.label, raw_names)
    table, reasons = validate.standardize(records, source)
    reasons = validate.check_rows(table, source, reasons)
    dimensions = [(j.key, j.prefix, lookups[j.source]) for j in spec.joins]
    table = validate.join_dimensions(table, dimensions)
    if spec.features.history:
        table = history_from_state(table, lookups["history"], spec.features)
    return derive(table, spec.features), reasons
