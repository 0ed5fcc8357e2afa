"""XGBoost training pieces shared by both plans, Tune, CV and the benchmarks.

Parameters, class-imbalance handling, resumable early stopping, the training function itself,
checkpoint keys, and reading splits and boosters from storage. `jobs.train` composes them.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xgboost as xgb

from jobs.config import Config, TrainConfig
from jobs.config_checks import KNOWN_PARAMS
from jobs.errors import TrainingError
from jobs.featurespec import feature_matrix
from jobs.storage import Storage, join

MODEL_FILE = "model.ubj"


@dataclass
class TrainResult:
    model_uri: str
    plan: str
    plan_reason: str
    params: dict
    imbalance: dict
    best_iteration: int
    rounds: int
    valid_aucpr: float
    resumed_from_round: int
    train_rows: int
    seconds: float
    cpus: float
    checkpoint_uri: str = ""
    history: dict = field(default_factory=dict)
    valid_metric: str = "aucpr"
    training_id: str = ""
    interruptions: dict = field(default_factory=dict)  # distributed plan: see jobs.preemption


OBJECTIVES = {
    # The last eval metric is the one early stopping (and our stopper) watches.
    "binary": {"objective": "binary:logistic", "eval_metric": ["logloss", "auc", "aucpr"]},
    "multiclass": {"objective": "multi:softprob", "eval_metric": ["merror", "mlogloss"]},
    "regression": {"objective": "reg:squarederror", "eval_metric": ["mae", "rmse"]},
}
MAXIMIZED = {"auc", "aucpr"}


def stop_metric(task: str) -> str:
    """The validation metric early stopping, Tune and summaries use by default for a task."""
    return OBJECTIVES[task]["eval_metric"][-1]


def xgb_params(
    train: TrainConfig,
    seed: int,
    nthread: int | None = None,
    imbalance: dict | None = None,
) -> dict:
    """XGBoost parameters for the task: its objective and metrics, then the config's params.

    The task and class count come from the imbalance record (`task_imbalance`), which every
    caller already carries and the bundle records."""
    task = (imbalance or {}).get("task", "binary")
    classes = (imbalance or {}).get("classes", 2)
    unknown = sorted(set(train.params) - KNOWN_PARAMS)
    if unknown:
        raise TrainingError(
            f"unknown hyperparameter(s) {unknown} in train.params; known: {sorted(KNOWN_PARAMS)}"
        )
    params = {
        **OBJECTIVES[task],
        **({"num_class": classes} if task == "multiclass" else {}),
        "tree_method": "hist",
        "seed": seed,
        "verbosity": 0,
        **train.params,
    }
    if train.gpus_per_worker > 0:
        params["device"] = "cuda"
    if task == "binary" and "scale_pos_weight" in (imbalance or {}):
        params["scale_pos_weight"] = imbalance["scale_pos_weight"]
    if nthread:
        params["nthread"] = nthread
    return params


def to_matrix(
    table: pa.Table, label: str, feature_names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    labels = table.column(label).to_numpy(zero_copy_only=False).astype(np.float32)
    return feature_matrix(table, feature_names), labels


def task_imbalance(
    task: str, class_counts: dict[str, int], train: TrainConfig, num_classes: int = 2
) -> dict:
    """The class-imbalance record for any task (it goes in the bundle's lineage).

    Multiclass: `scale_pos_weight` and `sample_weight` both mean balanced class weights
    (rows / (classes x rows of the class)); regression has no classes to balance.
    """
    if task == "binary":
        rows = sum(class_counts.values())
        return {**imbalance_plan(class_counts.get("1", 0), rows, train), "task": task}
    if task == "regression":
        return {"strategy": "none", "reason": "regression", "task": task}
    counts = {int(k): v for k, v in class_counts.items()}
    if len([v for v in counts.values() if v]) < 2:
        raise TrainingError(f"the training split has a single class ({counts}): nothing to learn")
    record: dict = {
        "strategy": train.imbalance.strategy,
        "class_counts": counts,
        "task": task,
        "classes": max(max(counts) + 1, num_classes),
    }
    if train.imbalance.strategy in ("scale_pos_weight", "sample_weight"):
        total, classes = sum(counts.values()), max(max(counts) + 1, num_classes)
        record["class_weights"] = [
            round(total / (classes * counts[k]), 6) if counts.get(k) else 0.0
            for k in range(classes)
        ]
    return record


def imbalance_plan(positives: int, rows: int, train: TrainConfig) -> dict:
    """Measures the class ratio and records how it is handled (this record goes in the bundle)."""
    negatives = rows - positives
    if positives == 0 or negatives == 0:
        raise TrainingError(
            f"the training split has a single class ({positives} positives, {negatives} "
            "negatives): nothing to learn"
        )
    ratio = negatives / positives
    record = {"strategy": train.imbalance.strategy, "negatives_per_positive": round(ratio, 3)}
    if train.imbalance.strategy == "scale_pos_weight":
        record["scale_pos_weight"] = round(ratio, 3)
    elif train.imbalance.strategy == "sample_weight":
        record["positive_weight"] = round(ratio, 3)
    elif train.imbalance.strategy == "downsample":
        ratio_kept = train.imbalance.downsample_ratio * positives / negatives
        record["negatives_kept_fraction"] = round(min(1.0, ratio_kept), 6)
    return record


def apply_imbalance(
    features: np.ndarray, labels: np.ndarray, record: dict, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Applies the recorded strategy to one shard: returns features, labels, sample weights."""
    if "class_weights" in record:
        weights = np.asarray(record["class_weights"], np.float64)
        return features, labels, weights[labels.astype(np.int64)]
    if "positive_weight" in record:
        return features, labels, np.where(labels == 1, record["positive_weight"], 1.0)
    if "negatives_kept_fraction" in record:
        rng = np.random.default_rng(seed)
        keep = (labels == 1) | (rng.random(len(labels)) < record["negatives_kept_fraction"])
        return features[keep], labels[keep], None
    return features, labels, None


class ResumableEarlyStopping(xgb.callback.TrainingCallback):
    """Early stopping on the validation metric whose state survives a restart.

    XGBoost's own EarlyStopping starts afresh when training continues from a checkpoint, so a
    resumed run could pick a different best round than an uninterrupted one; this one is saved
    with every checkpoint and restored with it.
    """

    def __init__(self, patience: int, metric: str | None = None, state: dict | None = None):
        """`metric` None watches the last eval metric (the task's: aucpr, mlogloss, rmse)."""
        state = state or {}
        self.patience, self.metric = patience, metric or state.get("metric")
        self.best_score: float | None = state.get("best_score")
        self.best_iteration: int = state.get("best_iteration", -1)

    def after_iteration(self, model, epoch, evals_log) -> bool:
        metrics = evals_log["valid"]
        self.metric = self.metric or list(metrics)[-1]
        score = float(metrics[self.metric][-1])
        iteration = model.num_boosted_rounds() - 1
        better = (
            (score > self.best_score if self.metric in MAXIMIZED else score < self.best_score)
            if self.best_score is not None
            else True
        )
        if better:
            self.best_score, self.best_iteration = score, iteration
        return iteration - self.best_iteration >= self.patience

    def state(self) -> dict:
        return {
            "best_score": self.best_score,
            "best_iteration": self.best_iteration,
            "metric": self.metric,
        }


def fit_booster(
    dtrain: xgb.DMatrix,
    dvalid: xgb.DMatrix,
    params: dict,
    train: TrainConfig,
    callbacks: list,
    start_from: xgb.Booster | None = None,
    stopper: ResumableEarlyStopping | None = None,
) -> tuple[xgb.Booster, dict]:
    """The training function both plans share; continues `start_from` when resuming.

    `stopper` goes first among the callbacks, so checkpoints taken after it see its state.
    """
    done = start_from.num_boosted_rounds() if start_from is not None else 0
    stopper = stopper or ResumableEarlyStopping(train.early_stopping_rounds)
    history: dict = {}
    booster = xgb.train(
        params,
        dtrain,
        num_boost_round=max(0, train.num_boost_round - done),
        evals=[(dvalid, "valid")],
        callbacks=[stopper, *callbacks],
        xgb_model=start_from,
        evals_result=history,
        verbose_eval=False,
    )
    return booster, history


def features_digest(storage: Storage, run_uri: str) -> str:
    """A digest of the run's feature splits (their fingerprints): features rebuilt on the same
    run get a new digest, so training never resumes from checkpoints of the old features."""
    report = storage.read_json(join(run_uri, "features", "_report.json"))
    payload = json.dumps(report["fingerprints"], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def training_key(train: TrainConfig, seed: int, features: str = "") -> str:
    """Names one training configuration on one set of features: a retry resumes its
    checkpoints, while a different configuration (a tuned one, say) or rebuilt features start
    from round 0."""
    settings = train.model_dump(mode="json", exclude={"max_failures", "plan"})
    payload = json.dumps({"train": settings, "seed": seed, "features": features}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def checkpoint_uri(run_uri: str, train: TrainConfig, seed: int, features: str = "") -> str:
    return join(run_uri, "train", "checkpoints", training_key(train, seed, features))


@dataclass
class Splits:
    """The train and valid matrices of a run, with the class-imbalance record they imply."""

    names: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    imbalance: dict


def load_splits(storage: Storage, run_uri: str, config: Config) -> Splits:
    """Reads a run's train/valid features and measures the class ratio (the single plan, Tune,
    and the benchmarks' plain baselines all start here)."""
    spec = storage.read_json(join(run_uri, "features", "feature_spec.json"))
    report = storage.read_json(join(run_uri, "features", "_report.json"))
    names, label = spec["feature_names"], config.features.label
    x_train, y_train = read_split(storage, run_uri, "train", label, names)
    x_valid, y_valid = read_split(storage, run_uri, "valid", label, names)
    imbalance = task_imbalance(
        config.task, report["class_counts"]["train"], config.train, len(spec.get("classes", []))
    )
    return Splits(names, x_train, y_train, x_valid, y_valid, imbalance)


def load_booster(storage: Storage, uri: str) -> xgb.Booster:
    booster = xgb.Booster()
    booster.load_model(bytearray(storage.read_bytes(uri)))
    return booster


def save_booster(storage: Storage, booster: xgb.Booster, uri: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, MODEL_FILE)
        booster.save_model(path)
        storage.write_bytes(uri, path.read_bytes())


def read_split(storage: Storage, run_uri: str, split: str, label: str, names: list[str]):
    table = storage.read_table_dir(join(run_uri, "features", split))
    return to_matrix(table, label, names)


def read_shard(storage: Storage, uri: str, columns: list[str], rank: int, world: int) -> pa.Table:
    """Rows [rank/world, (rank+1)/world) of the parquet files under `uri`, read straight from
    storage: only the row groups that hold them, only `columns`. The distributed plan's workers
    each read their own shard this way (no driver, object store or split coordinator between),
    and a shard is the same rows on every run and after a restart."""
    fs, _ = storage.filesystem(uri)
    paths = [f.removeprefix("s3://") for f in storage.list_files(uri)]
    files = [pq.ParquetFile(path, filesystem=fs) for path in paths]
    total = sum(f.metadata.num_rows for f in files)
    first, last = total * rank // world, total * (rank + 1) // world
    pieces, offset = [files[0].schema_arrow.empty_table().select(columns)], 0
    for file in files:
        for group in range(file.num_row_groups):
            rows = file.metadata.row_group(group).num_rows
            start, end = max(first, offset) - offset, min(last, offset + rows) - offset
            if start < end:
                pieces.append(file.read_row_group(group, columns=columns).slice(start, end - start))
            offset += rows
    return pa.concat_tables(pieces)
