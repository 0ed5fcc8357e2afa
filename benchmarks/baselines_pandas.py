"""rayline's ingest + features for one config, with pandas + numpy (see baselines_preprocess)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from benchmarks.baselines_preprocess import (
    keyed_hash,
    list_files,
    quarantine_records,
    read_jsonl,
    rule_plan,
    sample_fraction,
    source_order,
    summary,
    unique_columns,
    write_json,
)
from jobs.config import Config, SourceConfig
from jobs.features import SPLITS
from jobs.featurespec import HISTORY
from jobs.validate import NUMERIC_PATTERN, raw_columns

DATE32 = pd.ArrowDtype(pa.date32())


def _date_columns(config: Config, name: str) -> list[str]:
    """Date columns of a source's output; kept as datetime64[s] inside (fast) and written as
    date32 like rayline's (an ArrowDtype date column is converted row by row by some pandas ops)."""
    dates = [c for c, kind in config.sources[name].types.items() if kind == "date"]
    if name == config.fact:
        dates += [
            j.prefix + c
            for j in config.joins
            for c, kind in config.sources[j.source].types.items()
            if kind == "date"
        ]
    return dates


def _pd_dates(frame: pd.DataFrame, dates: list[str]) -> pd.DataFrame:
    return frame.assign(
        **{
            c: pd.Series(
                pa.array(frame[c]).cast(pa.date32(), safe=False), dtype=DATE32, index=frame.index
            )
            for c in dates
            if c in frame.columns
        }
    )


def _pd_cast(value: pd.Series, target: str, formats: list[str]) -> pd.Series:
    if not pd.api.types.is_string_dtype(value.dtype):
        return value.astype(
            {
                "string": "str",
                "int64": "int64",
                "float64": "float64",
                "timestamp": "datetime64[s]",
                "date": "datetime64[s]",
            }[target]
        )
    if target == "string":
        return value
    text = value.str.strip()
    if target in ("timestamp", "date"):
        parsed = None
        for form in formats if target == "timestamp" else ["%Y-%m-%d"]:
            this = pd.to_datetime(text, format=form, errors="coerce")
            parsed = this if parsed is None else parsed.fillna(this)
        return parsed.astype("datetime64[s]")
    number = pd.to_numeric(text.where(text.str.match(NUMERIC_PATTERN)), errors="coerce")
    if target == "int64":
        return number.where(number == np.floor(number)).astype("Int64")
    return number.astype("float64")


def _pd_read(source: SourceConfig, files: list[str]) -> pd.DataFrame:
    names = list(raw_columns(source).values())
    frames = []
    for path in files:
        if source.format == "parquet":
            frame = pd.read_parquet(path, columns=names).assign(_reason=None, _record=None)
        elif source.format == "csv":
            frame = pd.read_csv(
                path, usecols=names, dtype="str", keep_default_na=False, na_filter=False
            ).assign(_reason=None, _record=None)
        else:
            frame = pd.DataFrame(read_jsonl(path, source), dtype="str")
        frames.append(frame.assign(path=path))
    return pd.concat(frames, ignore_index=True)


def _pd_condition(kind, column, param, df, tables, config) -> np.ndarray:
    value = df[column]
    if kind == "lost":
        mask = df[f"_lost_{column}"]
    elif kind == "currency":
        mask = df["_rate"].isna() & value.notna()
    elif kind == "null":
        mask = value.isna()
    elif kind in ("below", "above"):
        mask = value < param if kind == "below" else value > param
    elif kind == "allowed":
        mask = ~value.isin(param) & value.notna()
    else:
        keys = tables[param][config.sources[param].primary_key]
        mask = ~value.isin(keys) & value.notna()
    return mask.to_numpy(dtype=bool, na_value=False)


def _pd_records(frame: pd.DataFrame) -> list[dict]:
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _pd_ingest_source(name, files, config, key, tables, out) -> tuple[pd.DataFrame, dict]:
    source = config.sources[name]
    raw = _pd_read(source, files)
    df = pd.DataFrame({"_i": np.arange(len(raw)), "path": raw["path"]})
    for standard, raw_name in raw_columns(source).items():
        value = _pd_cast(raw[raw_name], source.types[standard], source.timestamp_formats)
        df[standard] = value
        df[f"_lost_{standard}"] = value.isna() & raw[raw_name].notna()
    for column, mode in source.normalize.items():
        value = df[column].str.strip()
        df[column] = (
            value.str.lower()
            if mode == "lower"
            else (value.str.upper() if mode == "upper" else value)
        )
    columns = list(source.types)
    if source.currency:
        cur = source.currency
        df["_rate"] = df[cur.code].map(cur.rates).astype("float64")
        df[cur.output] = df[cur.amount] * df["_rate"]
        columns.append(cur.output)
    plan = rule_plan(source)
    conditions = [raw["_reason"].notna().to_numpy()]
    conditions += [
        _pd_condition(kind, col, param, df, tables, config) for kind, col, param, _ in plan
    ]
    reasons = np.select(conditions, [raw["_reason"].to_numpy(object)] + [p[3] for p in plan], None)
    flagged = np.flatnonzero(pd.notna(reasons))
    raw_names = list(raw_columns(source).values())
    raw_by_row = dict(zip(flagged.tolist(), _pd_records(raw.loc[flagged, raw_names]), strict=True))
    valid = pd.isna(reasons)
    for column in unique_columns(source):
        duplicate = np.zeros(len(df), bool)
        duplicate[valid] = df.loc[valid, column].duplicated(keep="first").to_numpy()
        reasons = np.where(pd.isna(reasons) & duplicate, f"{column}: duplicate", reasons)
    df["_reason"], df["_record"] = reasons, raw["_record"]
    for column, action in source.pii.items():
        if action == "drop":
            df, columns = df.drop(columns=column), [c for c in columns if c != column]
        else:
            df[column] = pd.Series(
                keyed_hash(df[column].tolist(), key), dtype="str", index=df.index
            )
    if name == config.fact:
        for join in config.joins:
            dim = tables[join.source]
            dim = dim.rename(columns={c: join.prefix + c for c in dim.columns if c != join.key})
            df = df.merge(dim, on=join.key, how="left")
            columns += [c for c in dim.columns if c != join.key]
    bad_mask = df["_reason"].notna()
    good = df.loc[~bad_mask, columns].reset_index(drop=True)
    bad = df.loc[bad_mask]
    dates = _date_columns(config, name)
    bad_rows = _pd_records(_pd_dates(bad[[*columns, "_i", "_record"]], dates))
    quarantine = pd.DataFrame(
        {
            "source": name,
            "path": bad["path"].to_numpy(),
            "reason": bad["_reason"].astype("str").to_numpy(),
            "record": quarantine_records(bad_rows, raw_by_row, source, key, columns),
        }
    )
    for frame, where in (
        (_pd_dates(good, dates), out / "ingest" / name),
        (quarantine, out / "quarantine" / name / "rows"),
    ):
        where.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(where / "part-0.parquet", index=False, compression="snappy")
    reasons = {str(k): int(v) for k, v in bad["_reason"].value_counts().items()}
    fingerprint = int(pd.util.hash_pandas_object(good, index=False).sum())
    return good, {
        "rows_in": len(df),
        "rows_out": len(good),
        "rows_quarantined": len(bad),
        "reasons": reasons,
        "hash": fingerprint,
    }


def run(config: Config, key: bytes, out: Path) -> dict:
    tables: dict[str, pd.DataFrame] = {}
    reports = {}
    for name in source_order(config):
        files = list_files(config.sources[name].uri)
        tables[name], reports[name] = _pd_ingest_source(name, files, config, key, tables, out)
    write_json(out / "ingest" / "_report.json", reports)
    f, fact = config.features, config.sources[config.fact]
    entity, amount = f.history.entity, f.history.amount
    df = tables[config.fact].sort_values([entity, f.timestamp, fact.primary_key], ignore_index=True)
    groups = df.groupby(entity, sort=False)
    count = groups.cumcount().astype("float64")
    df[HISTORY[0]] = count
    df[HISTORY[1]] = ((groups[amount].cumsum() - df[amount]) / count).where(count > 0)
    df[HISTORY[2]] = df[amount] / df[HISTORY[1]]
    df[HISTORY[3]] = groups[f.timestamp].diff().dt.total_seconds()
    ts = df[f.timestamp]
    for name, spec in f.derived.items():
        first = df[spec.columns[0]]
        if spec.kind == "years_since_year":
            df[name] = ts.dt.year.astype("float64") - first.astype("float64")
        elif spec.kind == "days_since":
            df[name] = (ts - first).dt.total_seconds() / 86400.0
        else:
            second = df[spec.columns[1]]
            df[name] = (first != second).astype("float64").where(first.notna() & second.notna())
    times = {"hour": lambda: ts.dt.hour, "day_of_week": lambda: ts.dt.dayofweek}
    for name in f.time_features:
        df[name] = times[name]().astype("float64")
    hashed = pd.util.hash_array(
        df[fact.primary_key].to_numpy(dtype=object), hash_key=f"{config.seed:016d}"[-16:]
    )
    df["_u"] = (hashed >> np.uint64(11)).astype(np.float64) / float(2**53)
    cuts = (config.split.train, config.split.train + config.split.valid)
    labels = df[f.label].to_numpy().astype(np.int64).clip(0, 1)
    uniform = df["_u"].to_numpy()
    bounds = {
        v: tuple(np.quantile(uniform[labels == v], cuts)) if (labels == v).any() else cuts
        for v in (0, 1)
    }
    low = np.where(labels == 1, bounds[1][0], bounds[0][0])
    high = np.where(labels == 1, bounds[1][1], bounds[0][1])
    df["split"] = np.where(uniform < low, "train", np.where(uniform < high, "valid", "test"))
    train = df[df["split"] == "train"]
    numeric = [*f.numeric, *f.time_features]
    sample = train[train["_u"] < sample_fraction(len(df), config)]
    medians = {}
    for name in numeric:
        values = sample[name].to_numpy(dtype="float64", na_value=np.nan)
        finite = values[np.isfinite(values)]
        medians[name] = float(np.median(finite)) if len(finite) else 0.0
    categories = {
        c: sorted(k for k, n in train[c].value_counts().items() if n >= f.min_category_count)
        for c in f.categorical
    }
    encoded = pd.DataFrame(index=df.index)
    for name in numeric:
        value = df[name].astype("float64").fillna(medians[name])
        if name in f.log_transform:
            value = np.log1p(value.clip(lower=0.0))
        encoded[name] = value.astype("float32")
    for name in f.categorical:
        codes = pd.Categorical(df[name], categories=categories[name]).codes
        encoded[name] = np.where(codes < 0, len(categories[name]), codes).astype("float32")
    encoded[f.label] = df[f.label]
    features_dir = out / "features"
    splits, positives, hashes = {}, {}, {}
    for name in SPLITS:
        part = encoded[df["split"] == name]
        (features_dir / name).mkdir(parents=True, exist_ok=True)
        part.to_parquet(features_dir / name / "part-0.parquet", index=False, compression="snappy")
        splits[name], positives[name] = len(part), int(part[f.label].sum())
        hashes[name] = int(pd.util.hash_pandas_object(part, index=False).sum())
    (features_dir / "test_raw").mkdir(parents=True, exist_ok=True)
    _pd_dates(df[df["split"] == "test"], _date_columns(config, config.fact)).drop(
        columns=["split", "_u"]
    ).to_parquet(features_dir / "test_raw" / "part-0.parquet", index=False, compression="snappy")
    state = (
        df.groupby(entity, sort=False)
        .agg(
            state_count=(amount, "count"),
            state_amount_sum=(amount, "sum"),
            state_last_ts=(f.timestamp, "max"),
        )
        .reset_index()
    )
    lookups = {j.source: tables[j.source] for j in config.joins} | {"history": state}
    (features_dir / "lookups").mkdir(parents=True, exist_ok=True)
    for name, table in lookups.items():
        dates = _date_columns(config, name) if name in config.sources else []
        _pd_dates(table, dates).to_parquet(
            features_dir / "lookups" / f"{name}.parquet", index=False, compression="zstd"
        )
    write_json(features_dir / "feature_spec.json", {"medians": medians, "categories": categories})
    write_json(
        features_dir / "_report.json", {"rows": splits, "positives": positives, "hash": hashes}
    )
    return summary(reports, splits, positives)
