"""rayline's ingest + features for one config, with polars (see baselines_preprocess)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

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


def run(config: Config, key: bytes, out: Path) -> dict:
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
