"""Cross-checks of a parsed config: every column named anywhere exists where it is used, the
task and its label fit together, and no PII column can become a feature.

They run when the config is parsed, before any work, and name the key path, so a typo fails in
a second instead of deep inside a Ray task after ingest. The label's implicit rules (not null,
known values) are added here, so unknown labels are quarantined by ingest like any bad row.
"""

from __future__ import annotations

HISTORY_FEATURES = [
    "hist_txn_count",
    "hist_amount_mean",
    "hist_amount_ratio",
    "hist_seconds_since_prev",
]
NEEDS_TIMESTAMP = {"years_since_year", "days_since"}
KNOWN_PARAMS = {
    "eta",
    "learning_rate",
    "max_depth",
    "min_child_weight",
    "subsample",
    "colsample_bytree",
    "colsample_bylevel",
    "colsample_bynode",
    "gamma",
    "min_split_loss",
    "lambda",
    "reg_lambda",
    "alpha",
    "reg_alpha",
    "max_delta_step",
    "max_bin",
    "max_leaves",
    "grow_policy",
    "tree_method",
    "scale_pos_weight",
    "sampling_method",
    "num_parallel_tree",
    "base_score",
    "max_cat_to_onehot",
    "monotone_constraints",
    "interaction_constraints",
    "seed",
    "nthread",
}
# Numeric parameters XGBoost refuses below zero; the others are strings, seeds or free numbers.
NON_NEGATIVE = KNOWN_PARAMS - {
    "grow_policy",
    "tree_method",
    "sampling_method",
    "base_score",
    "max_cat_to_onehot",
    "monotone_constraints",
    "interaction_constraints",
    "seed",
    "nthread",
}
TASK_METRICS = {
    "binary": ("pr_auc", "roc_auc", "f1", "log_loss", "brier"),
    "multiclass": ("log_loss", "macro_f1", "accuracy", "macro_pr_auc"),
    "regression": ("rmse", "mae", "r2"),
}
LOWER_IS_BETTER = {"log_loss", "brier", "rmse", "mae", "logloss", "mlogloss", "merror"}


def _fail(path: str, message: str) -> None:
    raise ValueError(f"{path}: {message}")


def joined_columns(config) -> dict[str, str]:
    """Column name after the joins -> the source it comes from."""
    columns = dict.fromkeys(config.sources[config.fact].columns(), config.fact)
    for join in config.joins:
        for column in config.sources[join.source].columns():
            if column != join.key:
                columns[join.prefix + column] = join.source
    return columns


def pii_columns(config) -> set[str]:
    """Declared PII columns under the names they have after the joins."""
    found = set(config.sources[config.fact].pii)
    for join in config.joins:
        found |= {join.prefix + c for c in config.sources[join.source].pii if c != join.key}
    return found


def check_sources(config) -> None:
    """Rules, PII, normalization, currency and join keys name declared columns."""

    def require(path: str, column: str | None, source: str) -> None:
        declared = config.sources[source].columns()
        if column is not None and column not in declared:
            _fail(
                path,
                f"{column!r} is not a column of source {source!r} (declared: {sorted(declared)})",
            )

    for name, source in config.sources.items():
        require(f"sources.{name}.primary_key", source.primary_key, name)
        for index, rule in enumerate(source.rules):
            require(f"sources.{name}.rules[{index}].column", rule.column, name)
            if rule.check == "references" and not config.sources[rule.source].primary_key:
                _fail(
                    f"sources.{name}.rules[{index}]",
                    f"source {rule.source!r} needs a primary_key to be referenced",
                )
        for key in source.normalize:
            require(f"sources.{name}.normalize", key, name)
        for key in source.pii:
            require(f"sources.{name}.pii", key, name)
        if source.currency:
            require(f"sources.{name}.currency.amount", source.currency.amount, name)
            require(f"sources.{name}.currency.code", source.currency.code, name)
    for index, join in enumerate(config.joins):
        require(f"joins[{index}].key", join.key, config.fact)
        require(f"joins[{index}].key", join.key, join.source)
        for side in (config.fact, join.source):
            if join.key in config.sources[side].pii:
                _fail(
                    f"joins[{index}].key",
                    f"{join.key!r} is PII in source {side!r}: a join "
                    "key is stored in the bundle's lookup tables, so it cannot be PII",
                )
    for name, source in config.sources.items():
        for index, rule in enumerate(source.rules):
            if rule.check != "references":
                continue
            target = config.sources[rule.source]
            hashed = (rule.column in source.pii, target.primary_key in target.pii)
            if hashed[0] != hashed[1]:
                _fail(
                    f"sources.{name}.rules[{index}]",
                    f"{rule.column!r} and "
                    f"{rule.source}.{target.primary_key} must both be PII or neither: a hashed "
                    "key never matches a clear one",
                )


def check_features(config) -> None:
    """Every feature, label, timestamp, history, split and slice column exists, in order."""
    features = config.features
    available = joined_columns(config)
    pii = pii_columns(config)
    fact = config.sources[config.fact]
    where = f"(available: {sorted(available)})"
    if features.label not in fact.columns():
        _fail("features.label", f"{features.label!r} is not a column of source {config.fact!r}")
    if features.timestamp is not None and features.timestamp not in fact.columns():
        _fail(
            "features.timestamp",
            f"{features.timestamp!r} is not a column of source {config.fact!r}",
        )
    if features.timestamp is not None and fact.types[features.timestamp] not in (
        "timestamp",
        "date",
    ):
        _fail("features.timestamp", f"{features.timestamp!r} must be declared timestamp or date")
    needs_time = [
        ("features.time_features", bool(features.time_features)),
        ("features.history", features.history is not None),
        ("split.by", config.split.by == "time"),
        *[
            (f"features.derived.{n}.kind", d.kind in NEEDS_TIMESTAMP)
            for n, d in features.derived.items()
        ],
    ]
    for path, needed in needs_time:
        if needed and features.timestamp is None:
            _fail(path, "needs features.timestamp, the event-time column (none is set)")
    if features.history:
        for key in ("entity", "amount"):
            if getattr(features.history, key) in pii:
                _fail(
                    f"features.history.{key}",
                    "a PII column cannot feed history features "
                    "(their state is stored in the bundle)",
                )
        if features.history.entity not in fact.columns():
            _fail(
                "features.history.entity",
                f"{features.history.entity!r} is not a column of source {config.fact!r}",
            )
        if features.history.amount not in available:
            _fail("features.history.amount", f"{features.history.amount!r} is not a column {where}")
    if config.split.group and config.split.group not in fact.columns():
        _fail("split.group", f"{config.split.group!r} is not a column of source {config.fact!r}")
    for name, derived in features.derived.items():
        expected = 2 if derived.kind == "not_equal" else 1
        if len(derived.columns) != expected:
            _fail(
                f"features.derived.{name}.columns",
                f"{derived.kind} takes {expected} column(s), got {len(derived.columns)}",
            )
        for index, column in enumerate(derived.columns):
            if column in pii:
                _fail(
                    f"features.derived.{name}.columns[{index}]",
                    f"{column!r} is a PII column and can never feed a feature",
                )
            if column not in available:
                _fail(
                    f"features.derived.{name}.columns[{index}]",
                    f"{column!r} is not a column {where}",
                )
        if name in available:
            _fail(f"features.derived.{name}", f"{name!r} already names a column")
    for name in features.windows:
        if not features.history:
            _fail(f"features.windows.{name}", "needs features.history (its entity and amount)")
        if name in available or name in features.derived or name in HISTORY_FEATURES:
            _fail(f"features.windows.{name}", f"{name!r} already names a column or feature")
    if features.windows and config.stream is None:
        _fail("features.windows", "window features live in the online state: add `stream:`")
    engineered = set(features.derived) | set(features.windows)
    engineered |= set(HISTORY_FEATURES) if features.history else set()
    usable = set(available) | engineered
    for key in ("numeric", "categorical"):
        for index, column in enumerate(getattr(features, key)):
            path = f"features.{key}[{index}]"
            if column not in usable:
                _fail(
                    path,
                    f"{column!r} is not a column {where}, a derived feature "
                    f"{sorted(features.derived)}, a history or a window feature",
                )
            if column == features.label:
                _fail(path, f"{column!r} is the label")
            if column in pii:
                _fail(path, f"{column!r} is a PII column and can never be a feature")
    for index, column in enumerate(features.log_transform):
        if column not in features.numeric:
            _fail(f"features.log_transform[{index}]", f"{column!r} is not in features.numeric")
    overlap = set(features.numeric) & set(features.categorical)
    if overlap:
        _fail("features.categorical", f"{sorted(overlap)} are also in features.numeric")
    sliceable = [*features.categorical, *features.time_features]
    for index, column in enumerate(config.evaluate.slices):
        if column not in sliceable:
            _fail(
                f"evaluate.slices[{index}]",
                f"{column!r} is not a categorical or time feature {sorted(sliceable)}",
            )
    if not (features.numeric or features.categorical or features.time_features):
        _fail("features", "no features: list numeric, categorical or time_features")


def check_task(config) -> None:
    """The task, the label's declared type, its mapping and the metrics must fit together."""
    task, features = config.task, config.features
    label_type = config.sources[config.fact].types[features.label]
    mapping = features.label_map
    if task == "regression":
        if mapping is not None:
            _fail("features.label", "a regression label is a number: no mapping")
        if label_type not in ("float64", "int64"):
            _fail(
                "features.label", f"a regression label must be float64 or int64, not {label_type}"
            )
    else:
        if task == "multiclass" and (mapping is None or mapping.positive is not None):
            _fail("features.label", "multiclass needs {column: ..., classes: [...]} or values")
        if mapping is not None and label_type != "string":
            _fail("features.label", f"a mapped label must be declared string, not {label_type}")
        if mapping is None and label_type not in ("int64", "bool"):
            _fail(
                "features.label",
                "declare how labels map to classes, e.g. "
                f'{{column: {features.label}, positive: "yes"}}',
            )
        if mapping is not None:
            indices = sorted(set(mapping.mapping().values()))
            classes = 2 if task == "binary" else len(indices)
            if indices != list(range(classes)) or classes < 2:
                _fail("features.label", f"class indices must be 0..{classes - 1}, got {indices}")
        if config.train.imbalance.strategy == "downsample" and task == "multiclass":
            _fail("train.imbalance.strategy", "downsample is for binary tasks")
    metric = config.evaluate.promotion.metric
    if metric is not None and metric not in TASK_METRICS[task]:
        _fail(
            "evaluate.promotion.metric",
            f"{metric!r} is not a {task} metric {list(TASK_METRICS[task])}",
        )
    tune_metric = config.tune.metric
    allowed = {
        "binary": {"aucpr", "auc", "logloss"},
        "multiclass": {"mlogloss", "merror"},
        "regression": {"rmse", "mae"},
    }[task]
    if tune_metric is not None and tune_metric not in allowed:
        _fail("tune.metric", f"{tune_metric!r} is not a {task} metric {sorted(allowed)}")


def check_search(config) -> None:
    """XGBoost parameter names and Tune's distributions, so a typo fails before ingest."""
    unknown = sorted(set(config.train.params) - KNOWN_PARAMS)
    if unknown:
        _fail(
            "train.params", f"unknown XGBoost parameter(s) {unknown}; known: {sorted(KNOWN_PARAMS)}"
        )
    for name, value in config.train.params.items():
        if name in NON_NEGATIVE and (isinstance(value, str) or value < 0):
            _fail(f"train.params.{name}", f"must be a number >= 0, got {value!r}")
    unknown = sorted(set(config.tune.space) - KNOWN_PARAMS)
    if unknown:
        _fail("tune.space", f"unknown XGBoost parameter(s) {unknown}")
    for name, spec in config.tune.space.items():
        path = f"tune.space.{name}"
        if len(spec) != 1:
            _fail(path, f"give exactly one distribution, got {list(spec)}")
        ((kind, args),) = spec.items()
        if kind == "choice":
            if not args:
                _fail(f"{path}.choice", "needs at least one value")
            continue
        if len(args) != 2 or any(isinstance(a, str) for a in args):
            _fail(f"{path}.{kind}", f"needs two numbers [low, high], got {args}")
        low, high = args
        if not low < high if kind != "randint" else not low <= high:
            _fail(f"{path}.{kind}", f"low must be below high, got {args}")
        if kind == "loguniform" and low <= 0:
            _fail(f"{path}.{kind}", f"bounds must be > 0, got {args}")
