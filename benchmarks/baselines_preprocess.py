"""Single-process polars and pandas versions of rayline's ingest + features, for the benchmark.

Both follow jobs/ingest.py, jobs/validate.py and jobs/features.py rule for rule, driven by the
same Config: lenient casts with a reason for lost values, normalize, currency, row rules with
first-failure-wins reasons, unique keeping the first valid row, references to the valid dimension
keys, quarantine with the raw record, HMAC of PII, left joins, point-in-time history, derived
features, a seeded stratified split, a spec fitted on train, transform, and the same outputs.
Known differences from rayline are listed in the benchmark's report (see preprocess.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa

from jobs.config import Allowed, Config, NotNull, Range, References, SourceConfig, Unique
from jobs.features import HISTORY, SPLITS
from jobs.validate import NUMERIC_PATTERN, raw_columns

# --------------------------------------------------------------------------------------------
# Shared helpers: the rule plan, file listing, the JSONL reader, PII and quarantine records.


def rule_plan(source: SourceConfig) -> list[tuple[str, str, object, str]]:
    """(kind, column, parameter, reason) in the order rayline records reasons."""
    plan: list[tuple[str, str, object, str]] = [
        ("lost", col, None, f"{col}: not a valid {kind}") for col, kind in source.types.items()
    ]
    if source.currency:
        plan.append(
            ("currency", source.currency.code, None, f"{source.currency.code}: unknown currency")
        )
    for rule in source.rules:
        if isinstance(rule, NotNull):
            plan.append(("null", rule.column, None, f"{rule.column}: is null"))
        elif isinstance(rule, Range):
            if rule.min is not None:
                plan.append(("below", rule.column, rule.min, f"{rule.column}: below {rule.min}"))
            if rule.max is not None:
                plan.append(("above", rule.column, rule.max, f"{rule.column}: above {rule.max}"))
        elif isinstance(rule, Allowed):
            plan.append(("allowed", rule.column, rule.values, f"{rule.column}: not allowed"))
        elif isinstance(rule, References):
            plan.append(
                (
                    "references",
                    rule.column,
                    rule.source,
                    f"{rule.column}: no such {rule.source} key",
                )
            )
    return plan


def unique_columns(source: SourceConfig) -> list[str]:
    return [rule.column for rule in source.rules if isinstance(rule, Unique)]


def source_order(config: Config) -> list[str]:
    return [name for name in config.sources if name != config.fact] + [config.fact]


def list_files(uri: str) -> list[str]:
    """Every visible file under a local source URI, sorted (as jobs.storage lists them)."""
    root = Path(uri).resolve()
    if root.is_file():
        return [str(root)]
    return sorted(
        str(path)
        for path in root.rglob("*")
        if path.is_file()
        and not any(part.startswith((".", "_")) for part in path.relative_to(root).parts)
    )


def read_jsonl(path: str, source: SourceConfig) -> dict[str, list]:
    """Line by line, as strings; lines that are not JSON objects or have a wrong JSON type are
    flagged with a reason and keep the line as their record (rayline's _read_text_file)."""
    mapping = raw_columns(source)
    names = list(mapping.values())
    declared = {raw: source.types[standard] for standard, raw in mapping.items()}
    out: dict[str, list] = {name: [] for name in [*names, "_reason", "_record"]}
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            for name in names:
                out[name].append(None)
            out["_reason"].append(f"jsonl: line {number} is not a JSON object")
            out["_record"].append(line)
            continue
        wrong = [n for n in names if isinstance(row.get(n), dict | list)]
        wrong += [
            n
            for n in names
            if declared[n] == "string" and row.get(n) is not None and not isinstance(row[n], str)
        ]
        for name in names:
            out[name].append(None if row.get(name) is None else str(row[name]))
        out["_reason"].append(f"{wrong[0]}: wrong JSON type" if wrong else None)
        out["_record"].append(line if wrong else None)
    return out


def keyed_hash(values: list, key: bytes) -> list:
    return [
        None if v is None else hmac.new(key, str(v).encode(), hashlib.sha256).hexdigest()[:32]
        for v in values
    ]


def quarantine_records(
    bad: list[dict], raw: dict[int, dict], source: SourceConfig, key: bytes, columns: list[str]
) -> list[str]:
    """rayline's record per quarantined row: the reader's line, else the raw row with PII
    hashed, else (rows flagged late, by a unique rule) the standardized and joined row."""
    records = []
    for row in bad:
        if row["_record"] is not None:
            records.append(row["_record"])
        elif row["_i"] in raw:
            record = raw[row["_i"]]
            for column, action in source.pii.items():
                name = next((r for r, s in source.rename.items() if s == column), column)
                if name in record and action == "drop":
                    record.pop(name)
                elif record.get(name) is not None:
                    record[name] = keyed_hash([record[name]], key)[0]
            records.append(json.dumps(record, default=str))
        else:
            records.append(json.dumps({c: row[c] for c in columns}, default=str))
    return records


def sample_fraction(rows: int, config: Config) -> float:
    return min(1.0, 500_000 / max(1.0, rows * config.split.train))


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))


def summary(reports: dict[str, dict], splits: dict[str, int], positives: dict[str, int]) -> dict:
    return {
        "rows_in": {name: r["rows_in"] for name, r in reports.items()},
        "clean": {name: r["rows_out"] for name, r in reports.items()},
        "quarantined": {name: r["rows_quarantined"] for name, r in reports.items()},
        "reasons": {name: r["reasons"] for name, r in reports.items()},
        "splits": splits,
        "positives": positives,
    }


# --------------------------------------------------------------------------------------------
# polars

PL_TYPES = {
    "string": pl.String,
    "int64": pl.Int64,
    "float64": pl.Float64,
    "timestamp": pl.Datetime("ms"),
    "date": pl.Date,
}


def _pl_cast(column: str, dtype: pl.DataType, target: str, formats: list[str]) -> pl.Expr:
    value = pl.col(column)
    if target == "string" or dtype != pl.String:
        return value.cast(PL_TYPES[target], strict=False)
    text = value.str.strip_chars()
    if target == "timestamp":
        return pl.coalesce([text.str.strptime(pl.Datetime("ms"), f, strict=False) for f in formats])
    if target == "date":
        return text.str.strptime(pl.Date, "%Y-%m-%d", strict=False)
    number = pl.when(text.str.contains(NUMERIC_PATTERN)).then(text).cast(pl.Float64, strict=False)
    if target == "int64":
        return pl.when(number == number.floor()).then(number).cast(pl.Int64, strict=False)
    return number


def _pl_read(source: SourceConfig, files: list[str]) -> pl.DataFrame:
    names = list(raw_columns(source).values())
    if source.format == "parquet":
        frame = pl.scan_parquet(files, include_file_paths="path", hive_partitioning=False)
        return (
            frame.select(*names, "path")
            .collect()
            .with_columns(
                pl.lit(None, pl.String).alias("_reason"), pl.lit(None, pl.String).alias("_record")
            )
        )
    frames = []
    for path in files:
        if source.format == "csv":
            frame = pl.read_csv(path, columns=names, infer_schema=False, empty_string_is_null=False)
            frame = frame.with_columns(
                pl.lit(None, pl.String).alias("_reason"), pl.lit(None, pl.String).alias("_record")
            )
        else:
            frame = pl.DataFrame(
                read_jsonl(path, source),
                schema_overrides={name: pl.String for name in [*names, "_reason", "_record"]},
            )
        frames.append(frame.with_columns(pl.lit(path).alias("path")))
    return pl.concat(frames)


def _pl_condition(kind: str, column: str, param, tables: dict, config: Config) -> pl.Expr:
    value = pl.col(column)
    if kind == "lost":
        return pl.col(f"_lost_{column}")
    if kind == "currency":
        return pl.col("_rate").is_null() & value.is_not_null()
    if kind == "null":
        return value.is_null()
    if kind in ("below", "above"):
        return value < param if kind == "below" else value > param
    if kind == "allowed":
        return ~value.is_in(pl.Series(param, dtype=pl.String).implode()) & value.is_not_null()
    keys = tables[param][config.sources[param].primary_key]
    return ~value.is_in(keys.implode()) & value.is_not_null()


def _pl_ingest_source(name, files, config, key, tables, out) -> tuple[pl.DataFrame, dict]:
    source = config.sources[name]
    raw = _pl_read(source, files).with_row_index("_i")
    df = raw.select(
        *[
            _pl_cast(r, raw.schema[r], source.types[s], source.timestamp_formats).alias(s)
            for s, r in raw_columns(source).items()
        ],
        *[
            (
                _pl_cast(r, raw.schema[r], source.types[s], source.timestamp_formats).is_null()
                & pl.col(r).is_not_null()
            ).alias(f"_lost_{s}")
            for s, r in raw_columns(source).items()
        ],
        "_i",
        "path",
        "_reason",
        "_record",
    )
    modes = {
        "lower": lambda e: e.str.to_lowercase(),
        "upper": lambda e: e.str.to_uppercase(),
        "strip": lambda e: e,
    }
    df = df.with_columns(
        modes[mode](pl.col(c).str.strip_chars()).alias(c) for c, mode in source.normalize.items()
    )
    columns = list(source.types)
    if source.currency:
        cur = source.currency
        df = df.with_columns(
            pl.col(cur.code)
            .replace_strict(cur.rates, default=None, return_dtype=pl.Float64)
            .alias("_rate")
        )
        df = df.with_columns((pl.col(cur.amount) * pl.col("_rate")).alias(cur.output))
        columns.append(cur.output)
    df = df.with_columns(
        pl.coalesce(
            pl.col("_reason"),
            *[
                pl.when(_pl_condition(kind, col, param, tables, config)).then(pl.lit(reason))
                for kind, col, param, reason in rule_plan(source)
            ],
        ).alias("_reason")
    )
    flagged = df.filter(pl.col("_reason").is_not_null())["_i"]
    raw_rows = raw.filter(pl.col("_i").is_in(flagged.implode())).drop("path", "_reason", "_record")
    raw_by_row = {row.pop("_i"): row for row in raw_rows.to_dicts()}
    valid = pl.col("_reason").is_null()
    df = df.with_columns(
        pl.coalesce(
            pl.col("_reason"),
            *[
                pl.when(valid & ~pl.col(c).is_first_distinct().over(valid)).then(
                    pl.lit(f"{c}: duplicate")
                )
                for c in unique_columns(source)
            ],
        ).alias("_reason")
    )
    for column, action in source.pii.items():
        df = (
            df.drop(column)
            if action == "drop"
            else df.with_columns(
                pl.col(column).map_batches(
                    lambda s: pl.Series(keyed_hash(s.to_list(), key), dtype=pl.String)
                )
            )
        )
        columns = [c for c in columns if c != column or action != "drop"]
    if name == config.fact:
        for join in config.joins:
            dim = tables[join.source]
            dim = dim.rename({c: join.prefix + c for c in dim.columns if c != join.key})
            df = df.join(dim, on=join.key, how="left")
            columns += [c for c in dim.columns if c != join.key]
    good = df.filter(pl.col("_reason").is_null()).select(columns)
    bad = df.filter(pl.col("_reason").is_not_null())
    records = quarantine_records(bad.to_dicts(), raw_by_row, source, key, columns)
    quarantine = pl.DataFrame(
        {
            "source": [name] * bad.height,
            "path": bad["path"],
            "reason": bad["_reason"],
            "record": records,
        }
    )
    for frame, where in (
        (good, out / "ingest" / name),
        (quarantine, out / "quarantine" / name / "rows"),
    ):
        where.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(where / "part-0.parquet", compression="snappy")
    reasons = dict(bad["_reason"].value_counts().iter_rows())
    return good, {
        "rows_in": df.height,
        "rows_out": good.height,
        "rows_quarantined": bad.height,
        "reasons": reasons,
        "hash": int(good.hash_rows().sum()),
    }


def run_polars(config: Config, key: bytes, out: Path) -> dict:
    tables: dict[str, pl.DataFrame] = {}
    reports = {}
    for name in source_order(config):
        files = list_files(config.sources[name].uri)
        tables[name], reports[name] = _pl_ingest_source(name, files, config, key, tables, out)
    write_json(out / "ingest" / "_report.json", reports)
    f, fact = config.features, config.sources[config.fact]
    ts, entity, amount = pl.col(f.timestamp), f.history.entity, pl.col(f.history.amount)
    df = tables[config.fact].sort(entity, f.timestamp, fact.primary_key)
    count = pl.int_range(pl.len()).over(entity).cast(pl.Float64)
    mean = pl.when(count > 0).then((amount.cum_sum() - amount).over(entity) / count)
    df = df.with_columns(count.alias(HISTORY[0]), mean.alias(HISTORY[1]))
    df = df.with_columns(
        (amount / pl.col(HISTORY[1])).alias(HISTORY[2]),
        ts.diff().over(entity).dt.total_seconds().cast(pl.Float64).alias(HISTORY[3]),
    )
    derived = []
    for name, spec in f.derived.items():
        first = pl.col(spec.columns[0])
        if spec.kind == "years_since_year":
            value = ts.dt.year().cast(pl.Float64) - first.cast(pl.Float64)
        elif spec.kind == "days_since":
            value = (ts.dt.epoch("s") - first.cast(pl.Datetime("ms")).dt.epoch("s")) / 86400.0
        else:
            value = (first != pl.col(spec.columns[1])).cast(pl.Float64)
        derived.append(value.alias(name))
    times = {"hour": ts.dt.hour(), "day_of_week": ts.dt.weekday() - 1}
    derived += [times[name].cast(pl.Float64).alias(name) for name in f.time_features]
    uniform = (pl.col(fact.primary_key).hash(config.seed) // 2048).cast(pl.Float64) / 2.0**53
    df = df.with_columns(*derived, uniform.alias("_u"))
    cuts = (config.split.train, config.split.train + config.split.valid)
    bounds = df.group_by(f.label).agg(
        pl.col("_u").quantile(cuts[0], "linear").alias("_lo"),
        pl.col("_u").quantile(cuts[1], "linear").alias("_hi"),
    )
    bounds = {row[f.label]: (row["_lo"], row["_hi"]) for row in bounds.to_dicts()}
    lab = pl.col(f.label).clip(0, 1)
    lo = pl.when(lab == 1).then(bounds.get(1, cuts)[0]).otherwise(bounds.get(0, cuts)[0])
    hi = pl.when(lab == 1).then(bounds.get(1, cuts)[1]).otherwise(bounds.get(0, cuts)[1])
    df = df.with_columns(
        pl.when(pl.col("_u") < lo)
        .then(pl.lit("train"))
        .when(pl.col("_u") < hi)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("test"))
        .alias("split")
    )
    train = df.filter(pl.col("split") == "train")
    numeric = [*f.numeric, *f.time_features]
    sample = train.filter(pl.col("_u") < sample_fraction(df.height, config))
    medians = sample.select(
        pl.col(c)
        .cast(pl.Float64)
        .filter(pl.col(c).cast(pl.Float64).is_finite())
        .median()
        .fill_null(0.0)
        for c in numeric
    ).row(0, named=True)
    categories = {
        c: sorted(
            k
            for k, n in train[c].value_counts().iter_rows()
            if k is not None and n >= f.min_category_count
        )
        for c in f.categorical
    }
    encoded = df.select(
        *[
            (lambda v, c: v.clip(lower_bound=0.0).log1p() if c in f.log_transform else v)(
                pl.col(c).cast(pl.Float64).fill_nan(None).fill_null(medians[c]), c
            )
            .cast(pl.Float32)
            .alias(c)
            for c in numeric
        ],
        *[
            pl.col(c)
            .replace_strict(
                categories[c],
                list(range(len(categories[c]))),
                default=None,
                return_dtype=pl.Float32,
            )
            .fill_null(float(len(categories[c])))
            .alias(c)
            for c in f.categorical
        ],
        f.label,
        "split",
    )
    features_dir = out / "features"
    splits, positives, hashes = {}, {}, {}
    for name in SPLITS:
        part = encoded.filter(pl.col("split") == name).drop("split")
        (features_dir / name).mkdir(parents=True, exist_ok=True)
        part.write_parquet(features_dir / name / "part-0.parquet", compression="snappy")
        splits[name], positives[name] = part.height, int(part[f.label].sum())
        hashes[name] = int(part.hash_rows().sum())
    (features_dir / "test_raw").mkdir(parents=True, exist_ok=True)
    df.filter(pl.col("split") == "test").drop("split", "_u").write_parquet(
        features_dir / "test_raw" / "part-0.parquet", compression="snappy"
    )
    state = df.group_by(entity).agg(
        amount.count().cast(pl.Int64).alias("state_count"),
        amount.sum().alias("state_amount_sum"),
        ts.max().alias("state_last_ts"),
    )
    lookups = {j.source: tables[j.source] for j in config.joins} | {"history": state}
    (features_dir / "lookups").mkdir(parents=True, exist_ok=True)
    for name, table in lookups.items():
        table.write_parquet(features_dir / "lookups" / f"{name}.parquet", compression="zstd")
    write_json(features_dir / "feature_spec.json", {"medians": medians, "categories": categories})
    write_json(
        features_dir / "_report.json", {"rows": splits, "positives": positives, "hash": hashes}
    )
    return summary(reports, splits, positives)


# --------------------------------------------------------------------------------------------
# pandas (+ numpy)

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


def run_pandas(config: Config, key: bytes, out: Path) -> dict:
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
