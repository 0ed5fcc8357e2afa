"""Cross-validation: k-fold over train + valid (stratified for classification), folds in
parallel as Ray tasks.

Each fold trains with the configured parameters, early-stops on a stratified slice of its own
training part (never on the held-out fold), and is scored on the held-out fold. The test split
stays untouched for `jobs.evaluate`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Annotated

import numpy as np
import ray
import typer
import xgboost as xgb
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

from jobs.boosting import apply_imbalance, read_split, task_imbalance, xgb_params
from jobs.config import Config, load_config
from jobs.entrypoint import run_cli
from jobs.errors import TrainingError
from jobs.evaluate import choose_threshold
from jobs.metrics import HEADLINE, task_metrics
from jobs.ray_runtime import init_ray
from jobs.storage import Storage, join


@dataclass
class CVResult:
    folds: int
    per_fold: list[dict]
    mean: dict
    std: dict
    seconds: float
    results_uri: str


@ray.remote
def _fold(
    x: np.ndarray,
    y: np.ndarray,
    train_index: np.ndarray,
    test_index: np.ndarray,
    config: Config,
    params: dict,
    imbalance: dict,
    fold: int,
    classes: list[str],
) -> dict:
    stratify = y[train_index] if config.task != "regression" else None
    inner_train, inner_valid = train_test_split(
        train_index, test_size=0.15, stratify=stratify, random_state=config.seed + fold
    )
    x_fit, y_fit, weights = apply_imbalance(
        x[inner_train], y[inner_train], imbalance, config.seed + fold
    )
    dtrain = xgb.QuantileDMatrix(x_fit, y_fit, weight=weights)
    dvalid = xgb.QuantileDMatrix(x[inner_valid], y[inner_valid], ref=dtrain)
    booster = xgb.train(
        params,
        dtrain,
        num_boost_round=config.train.num_boost_round,
        evals=[(dvalid, "valid")],
        early_stopping_rounds=config.train.early_stopping_rounds,
        verbose_eval=False,
    )
    rounds = (0, booster.best_iteration + 1)
    threshold = None
    if config.task == "binary":
        valid_scores = booster.inplace_predict(x[inner_valid], iteration_range=rounds)
        threshold = choose_threshold(y[inner_valid], valid_scores, config.evaluate.threshold)
    scores = booster.inplace_predict(x[test_index], iteration_range=rounds)
    metrics = task_metrics(config.task, y[test_index], scores, threshold, classes)
    return {
        "fold": fold,
        "best_iteration": booster.best_iteration,
        "threshold": threshold,
        **{k: metrics[k] for k in HEADLINE[config.task]},
    }


def _spread(folds: list[dict], metric: str, statistic) -> float:
    """A statistic over folds, ignoring folds where the metric is undefined (one class)."""
    values = np.array([np.nan if f[metric] is None else f[metric] for f in folds], dtype=float)
    return float(statistic(values)) if np.isfinite(values).any() else float("nan")


def cross_validate(
    config: Config,
    run_uri: str,
    folds: int = 5,
    storage: Storage | None = None,
    cpus_per_fold: int = 1,
) -> CVResult:
    """Runs stratified k-fold CV on the run's train + valid splits."""
    if folds < 2:
        raise TrainingError(f"--folds must be at least 2, got {folds}")
    storage = storage or Storage(config.s3)
    started = time.perf_counter()
    spec = storage.read_json(join(run_uri, "features", "feature_spec.json"))
    init_ray(config)
    names, label = spec["feature_names"], config.features.label
    parts = [read_split(storage, run_uri, split, label, names) for split in ("train", "valid")]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    classes = spec.get("classes", [])
    values, sizes = np.unique(y, return_counts=True)
    counts = (
        {}
        if config.task == "regression"
        else {str(int(k)): int(v) for k, v in zip(values, sizes, strict=True)}
    )
    imbalance = task_imbalance(config.task, counts, config.train, len(classes))
    params = xgb_params(config.train, config.seed, cpus_per_fold, imbalance)
    x_ref, y_ref = ray.put(x), ray.put(y)
    kind = KFold if config.task == "regression" else StratifiedKFold
    splitter = kind(n_splits=folds, shuffle=True, random_state=config.seed)
    tasks = [
        _fold.options(num_cpus=cpus_per_fold).remote(
            x_ref, y_ref, train_index, test_index, config, params, imbalance, fold, classes
        )
        for fold, (train_index, test_index) in enumerate(splitter.split(x, y))
    ]
    per_fold = sorted(ray.get(tasks), key=lambda row: row["fold"])
    result = CVResult(
        folds=folds,
        per_fold=per_fold,
        mean={k: _spread(per_fold, k, np.nanmean) for k in HEADLINE[config.task]},
        std={
            k: _spread(per_fold, k, lambda v: np.nanstd(v, ddof=1)) for k in HEADLINE[config.task]
        },
        seconds=round(time.perf_counter() - started, 3),
        results_uri=join(run_uri, "cv", "results.json"),
    )
    storage.write_json(result.results_uri, asdict(result))
    return result


def main(
    config: Annotated[str, typer.Option(help="Pipeline config YAML")],
    run: Annotated[str, typer.Option(help="Run URI with a features/ output")],
    folds: Annotated[int, typer.Option(help="Number of stratified folds")] = 5,
) -> None:
    """Stratified k-fold cross-validation; prints mean and spread of each metric."""
    from jobs.summary import print_rows

    result = cross_validate(load_config(config), run, folds)
    print_rows(
        f"cross-validation ({folds} folds, {result.seconds:.1f} s)",
        {k: f"{result.mean[k]:.4f} ± {result.std[k]:.4f}" for k in result.mean}
        | {"results": result.results_uri},
    )


if __name__ == "__main__":
    run_cli(main)
