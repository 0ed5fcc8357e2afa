"""The same work as rayline's ingest + features, in one process: polars and pandas baselines.

benchmarks/baselines_polars.py and benchmarks/baselines_pandas.py follow jobs/ingest.py,
jobs/validate.py and jobs/features.py rule for rule, driven by the same Config: lenient casts
with a reason for lost values, normalize, currency, row rules with first-failure-wins reasons,
unique keeping the first valid row, references to the valid dimension keys, quarantine with the
raw record, HMAC of PII, left joins, point-in-time history, derived features, a seeded
stratified split, a spec fitted on train only, transform, and the same outputs and fingerprints.
This module holds what they share, `run`, and the known differences from rayline (NOTES).
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import json
from pathlib import Path

from jobs.config import Allowed, Config, NotNull, Range, References, SourceConfig, Unique
from jobs.validate import raw_columns

BASELINES = ("polars", "pandas")
NOTES = [
    "polars splits on polars' own seeded hash of transaction_id, so its split membership (and "
    "the medians fitted on train) differ from rayline's; the sizes agree. pandas uses rayline's "
    "hash (pd.util.hash_array) and matches rayline's outputs exactly.",
    "the baselines keep the clean joined table in memory for the features step; rayline writes "
    "it and reads it back (features is a separate stage).",
    "history means use a per-customer cumulative sum (rayline: one global cumsum minus the group "
    "start), so they can differ in the last bits (~1e-12 relative).",
    "rayline also probes every file's schema before reading; the baselines just read the files.",
    "the baselines do not quarantine CSV lines with a wrong number of fields as rayline does "
    "(the generated data has none); polars timestamps are ms (no seconds unit; the parquet "
    "files hold ms for all three).",
]


def run(name: str, config: Config, key: bytes, out: Path) -> dict:
    """Runs one baseline (`polars` or `pandas`) end to end; returns its row counts."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
    return importlib.import_module(f"benchmarks.baselines_{name}").run(config, key, out)


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
