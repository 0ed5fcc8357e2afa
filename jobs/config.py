"""Typed configuration: one YAML file per use case, parsed into pydantic models.

Unknown keys and wrong types are errors that name the key path, raised before any work
starts, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from jobs.config_checks import (
    LOWER_IS_BETTER,
    TASK_METRICS,
    check_features,
    check_search,
    check_sources,
    check_task,
)
from jobs.errors import ConfigError
from jobs.label_map import LabelMap
from jobs.serve_config import ServeConfig, Strict, check_online_state
from jobs.stream_config import StreamConfig, WindowFeature

__all__ = [
    "LOWER_IS_BETTER",
    "TASK_METRICS",
    "Config",
    "ConfigError",
    "load_config",
    "parse_config",
]


ColumnType = Literal["string", "int64", "float64", "bool", "timestamp", "date"]


class NotNull(Strict):
    check: Literal["not_null"]
    column: str


class Range(Strict):
    check: Literal["range"]
    column: str
    min: float | None = None
    max: float | None = None


class Allowed(Strict):
    check: Literal["allowed"]
    column: str
    values: list[str]


class Unique(Strict):
    check: Literal["unique"]
    column: str


class References(Strict):
    check: Literal["references"]
    column: str
    source: str = Field(description="Name of the source whose primary key this column references.")


Rule = Annotated[NotNull | Range | Allowed | Unique | References, Field(discriminator="check")]


class CurrencyConfig(Strict):
    """Converts `amount` in currency `code` into `output` in the `target` currency."""

    amount: str
    code: str
    output: str
    target: str = "USD"
    rates: dict[str, float]


class SourceConfig(Strict):
    format: Literal["parquet", "csv", "jsonl"]
    uri: str
    primary_key: str | None = None
    rename: dict[str, str] = Field(default_factory=dict, description="raw name -> standard name")
    types: dict[str, ColumnType] = Field(
        default_factory=dict, description="standard column -> type; the columns kept"
    )
    timestamp_formats: list[str] = Field(default_factory=lambda: ["%Y-%m-%dT%H:%M:%S"])
    normalize: dict[str, Literal["lower", "upper", "strip"]] = Field(default_factory=dict)
    currency: CurrencyConfig | None = None
    rules: list[Rule] = Field(default_factory=list)
    pii: dict[str, Literal["hash", "drop"]] = Field(
        default_factory=dict, description="PII column -> hashed with a key or dropped"
    )
    encoding: str = Field(
        "utf-8", description="text encoding of CSV/JSONL files; undecodable lines are quarantined"
    )
    multiline: bool = Field(
        False, description="CSV only: quoted values may span lines (off: one record per line)"
    )

    @model_validator(mode="after")
    def _known_encoding(self) -> SourceConfig:
        import codecs

        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"encoding: unknown text encoding {self.encoding!r}") from None
        return self

    def columns(self) -> set[str]:
        """The standard columns this source produces."""
        return {*self.types, *([self.currency.output] if self.currency else [])}


class JoinConfig(Strict):
    source: str
    key: str
    prefix: str = ""


class PiiConfig(Strict):
    """Where the key for hashing PII comes from; the columns are declared per source."""

    key_env: str = "RAYLINE_PII_KEY"
    allow_demo_key: bool = Field(
        False, description="hash with a public key when key_env is unset (sample data only)"
    )


class SplitConfig(Strict):
    """How rows are split. `random`: a seeded hash of the primary key, stratified by class;
    `time`: the latest `test` fraction by timestamp is test, the `valid` before it is valid;
    `group`: whole values of `group` (e.g. a customer) land in one split."""

    by: Literal["random", "time", "group"] = "random"
    group: str | None = Field(None, description="column whose values stay in one split (by: group)")
    train: float = Field(0.7, gt=0)
    valid: float = Field(0.15, gt=0)
    test: float = Field(0.15, gt=0)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        if abs(self.train + self.valid + self.test - 1.0) > 1e-6:
            raise ValueError("split fractions train + valid + test must sum to 1")
        if self.by == "group" and not self.group:
            raise ValueError("split.by: group needs split.group, the column to group by")
        return self


class DerivedFeature(Strict):
    kind: Literal["years_since_year", "days_since", "not_equal"]
    columns: list[str]


class HistoryConfig(Strict):
    """Per-entity history features computed only from earlier events (no future leakage)."""

    entity: str = "customer_id"
    amount: str = "amount_usd"


class FeaturesConfig(Strict):
    label: str = Field("label", description="the label column (or {column: ..., <LabelMap>})")
    label_map: LabelMap | None = None
    timestamp: str | None = Field(
        None,
        description="event time; needed by history, time "
        "features, days_since/years_since_year and split.by: time",
    )
    numeric: list[str] = Field(default_factory=list)
    log_transform: list[str] = Field(default_factory=list)
    categorical: list[str] = Field(default_factory=list)
    min_category_count: int = 5
    time_features: list[Literal["hour", "day_of_week"]] = Field(default_factory=list)
    derived: dict[str, DerivedFeature] = Field(default_factory=dict)
    history: HistoryConfig | None = None
    windows: dict[str, WindowFeature] = Field(
        default_factory=dict,
        description="event-time aggregates of history.amount per entity; need `stream:`",
    )

    @model_validator(mode="before")
    @classmethod
    def _label_as_mapping(cls, data):
        """`label: {column: whi, positive: "yes"}` is `label: whi` plus a `label_map`."""
        if isinstance(data, dict) and isinstance(data.get("label"), dict):
            label = dict(data["label"])
            if "column" not in label:
                raise ValueError("label: a mapping needs `column`, the label column")
            data = {**data, "label": label.pop("column"), "label_map": label}
        return data


class ImbalanceConfig(Strict):
    strategy: Literal["scale_pos_weight", "sample_weight", "downsample", "none"] = (
        "scale_pos_weight"
    )
    downsample_ratio: float = Field(10.0, gt=0, description="negatives kept per positive")


class TrainConfig(Strict):
    plan: Literal["auto", "single", "distributed"] = "auto"
    single_plan_max_rows: int = 5_000_000
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    num_boost_round: int = Field(300, ge=1)
    early_stopping_rounds: int = Field(20, ge=1)
    checkpoint_every: int = Field(25, ge=1)
    max_failures: int = Field(2, ge=0)
    max_preemptions: int = Field(
        10, ge=-1, description="spot interruptions a distributed fit recovers from (-1: any)"
    )
    preemption_check_every: int = Field(
        10, ge=1, description="rounds between asks for a preemption notice (a worker barrier)"
    )
    label_selector: dict[str, str] = Field(
        default_factory=dict,
        description="run training only on nodes with these labels, e.g. "
        "{ray.io/market-type: spot}; Ray 2.60 label selectors ('!v', 'in(a,b)') allowed",
    )
    imbalance: ImbalanceConfig = Field(default_factory=ImbalanceConfig)
    params: dict[str, float | int | str] = Field(default_factory=dict)


Distribution = Literal["uniform", "loguniform", "randint", "choice"]


class TuneConfig(Strict):
    """Ray Tune over the training function; `space` maps a param to {distribution: [args]}."""

    search: Literal["random", "optuna"] = "random"
    num_samples: int = Field(16, ge=1, description="maximum number of trials")
    max_concurrent: int = Field(2, ge=1)
    time_budget_s: float | None = Field(None, gt=0, description="stop starting trials after this")
    budget_usd: float | None = Field(
        None, gt=0, description="stop when the cluster has spent this many dollars since tuning"
    )
    asha: bool = True
    grace_period: int = Field(10, ge=1)
    reduction_factor: int = Field(3, ge=2)
    cpus_per_trial: float = Field(1, gt=0)
    num_boost_round: int = Field(100, ge=1)
    metric: Literal["aucpr", "auc", "logloss", "mlogloss", "merror", "rmse", "mae"] | None = Field(
        None, description="XGBoost metric to optimise; default aucpr, mlogloss or rmse by task"
    )
    space: dict[str, dict[Distribution, list[float | int | str]]] = Field(
        default_factory=lambda: {
            "eta": {"loguniform": [0.02, 0.3]},
            "max_depth": {"randint": [3, 10]},
            "min_child_weight": {"loguniform": [0.5, 20.0]},
            "subsample": {"uniform": [0.6, 1.0]},
            "colsample_bytree": {"uniform": [0.5, 1.0]},
        }
    )


class ThresholdConfig(Strict):
    rule: Literal["max_f1", "target_recall", "min_cost"] = "max_f1"
    target_recall: float = Field(0.8, gt=0, le=1)
    cost_false_positive: float = 1.0
    cost_false_negative: float = 20.0


class PromotionConfig(Strict):
    metric: str | None = Field(None, description="default: pr_auc, log_loss or rmse by task")
    min_improvement: float = Field(
        0.0, description="in the metric's better direction; negative accepts a slightly worse model"
    )


class EvaluateConfig(Strict):
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)
    calibration: Literal["isotonic", "platt", "none"] = Field(
        "isotonic", description="binary: fitted on the valid split, stored in the bundle"
    )
    slices: list[str] = Field(default_factory=list)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)


class S3Config(Strict):
    """Where s3:// URIs point. Credentials come from the standard AWS chain, never from here."""

    endpoint_url: str | None = None
    region: str = "us-east-1"


class RayConfig(Strict):
    num_cpus: int | None = Field(None, description="CPUs for a local Ray; ignored on a cluster")


class Config(Strict):
    name: str
    task: Literal["binary", "multiclass", "regression"] = "binary"
    seed: int = 42
    storage: str = Field(description="Root URI for run outputs and the registry (path or s3://)")
    s3: S3Config = Field(default_factory=S3Config)
    ray: RayConfig = Field(default_factory=RayConfig)
    sources: dict[str, SourceConfig]
    fact: str = Field("transactions", description="The source that holds one row per example")
    joins: list[JoinConfig] = Field(default_factory=list)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    stream: StreamConfig | None = Field(None, description="Redis Streams and online state")

    @model_validator(mode="after")
    def _references_exist(self) -> Config:
        if self.fact not in self.sources:
            raise ValueError(
                f"fact source {self.fact!r} is not among sources {sorted(self.sources)}"
            )
        for join in self.joins:
            if join.source not in self.sources:
                raise ValueError(f"joins: unknown source {join.source!r}")
        for name, source in self.sources.items():
            for rule in source.rules:
                if isinstance(rule, References) and rule.source not in self.sources:
                    raise ValueError(f"sources.{name}.rules: unknown source {rule.source!r}")
        check_sources(self)
        check_features(self)
        check_task(self)
        check_search(self)
        check_online_state(self)
        add_label_rules(self)
        for served in self.serve.models:
            served.name = served.name or self.name
        return self

    def digest(self) -> str:
        """A stable hash of the effective config, recorded in lineage."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


def _format_errors(error: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        got_text = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        lines.append(f"  {path}: {message}{got_text}" if path else f"  {message}")
    return "\n".join(lines)


def parse_config(data: dict, origin: str = "<dict>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, origin)) from None


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    """Reads a YAML config; `overrides` are merged on top (dotted keys allowed)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_config(data, origin=str(path))


def rebased(config: Config, root: str) -> Config:
    """The config with its relative local URIs (storage, sources, serve sample URI) made
    absolute under `root`: a job submitted with `--working-dir .` runs in a temporary copy of
    the repo without data/ (gitignored), so `--root "$PWD"` points it back at the checkout."""
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise ConfigError(f"--root {root!r} is not a directory")

    def absolute(uri: str) -> str:
        return uri if "://" in uri or Path(uri).is_absolute() else str(base / uri)

    config = config.model_copy(deep=True)
    config.storage = absolute(config.storage)
    for source in config.sources.values():
        source.uri = absolute(source.uri)
    return config


def add_label_rules(config) -> None:
    """Rows with a null or unknown label are quarantined at ingest, like any other bad row."""
    features, task = config.features, config.task
    fact = config.sources[config.fact]
    label = features.label
    existing = {(rule.check, rule.column) for rule in fact.rules}
    implicit = []
    if ("not_null", label) not in existing:
        implicit.append(NotNull(check="not_null", column=label))
    if features.label_map is not None:
        fact.normalize.setdefault(label, "lower")
        known = sorted(features.label_map.mapping())
        closed = features.label_map.positive is None or features.label_map.negative is not None
        if closed and ("allowed", label) not in existing:
            implicit.append(Allowed(check="allowed", column=label, values=known))
    elif task != "regression" and fact.types[label] == "int64" and ("range", label) not in existing:
        implicit.append(Range(check="range", column=label, min=0, max=1))
    fact.rules = [*fact.rules, *implicit]
