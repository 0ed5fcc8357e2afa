"""Train: XGBoost on the train split, early stopping on valid, checkpoints to storage.

Two plans, one training function. `distributed` (jobs/train_distributed.py) runs Ray Train's
XGBoostTrainer, each worker reading its own contiguous shard of the features from storage;
`single` (jobs/train_plans.py) runs one Ray task holding all of a node's CPUs, which skips Ray
Train's fixed costs (worker group start, report polling) that dominate small data. Both
checkpoint every N rounds and resume from the latest checkpoint after a failure; the
distributed plan also checkpoints just in time on a spot preemption notice.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated

import ray
import typer
import xgboost as xgb

from jobs.boosting import (
    MODEL_FILE,
    TrainResult,
    features_digest,
    stop_metric,
    task_imbalance,
    training_key,
    xgb_params,
)
from jobs.config import Config, TrainConfig, load_config
from jobs.entrypoint import run_cli
from jobs.errors import TrainingError, causes
from jobs.ray_runtime import init_ray
from jobs.runs import new_run_id
from jobs.storage import Storage, join
from jobs.train_distributed import run_distributed
from jobs.train_plans import run_single


def choose_plan(train: TrainConfig, rows: int, cluster_cpus: float, nodes: int) -> tuple[str, str]:
    if train.plan != "auto":
        return train.plan, f"forced by train.plan={train.plan}"
    if rows <= train.single_plan_max_rows or nodes <= 1:
        where = "one node" if nodes <= 1 else f"{rows:,} rows <= {train.single_plan_max_rows:,}"
        return "single", (
            f"{where}: one task with {cluster_cpus:g} CPUs avoids Ray Train's fixed start-up cost"
        )
    return "distributed", f"{rows:,} rows > {train.single_plan_max_rows:,} on {nodes} nodes"


def _xgboost_refusal(error: BaseException) -> str | None:
    """The telling line of an XGBoostError behind `error` (also from inside a Ray task)."""
    refusal = next((e for e in causes(error) if isinstance(e, xgb.core.XGBoostError)), None)
    if refusal is None:
        return None
    lines = [line for line in str(refusal).splitlines() if line.strip()]
    telling = [line for line in lines if "Check failed" in line or "Invalid" in line]
    return (telling or lines or ["XGBoostError"])[0]


def train_model(
    config: Config,
    run_uri: str,
    storage: Storage | None = None,
    params_override: dict | None = None,
) -> TrainResult:
    """Trains on `run_uri`'s feature splits; the model goes to its own folder
    `train/models/<training id>/`, so a later training in the same run (a tuned retrain) never
    overwrites a model that a registered bundle's lineage points at. `train/_result.json`
    names the latest one."""
    storage = storage or Storage(config.s3)
    started = time.perf_counter()
    train_cfg = config.train
    if params_override:
        train_cfg = train_cfg.model_copy(update={"params": {**train_cfg.params, **params_override}})
    xgb_params(train_cfg, config.seed)  # validate names before any work
    features_uri = join(run_uri, "features")
    report = storage.read_json(join(features_uri, "_report.json"))
    rows = report["rows"]["train"]
    if rows == 0:
        raise TrainingError(f"empty training split at {join(features_uri, 'train')}")
    init_ray(config)  # after the inputs are known to be there: a bad run fails in a second
    nodes = [n for n in ray.nodes() if n["Alive"]]
    cluster_cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
    plan, reason = choose_plan(train_cfg, rows, cluster_cpus, len(nodes))
    runner = run_single if plan == "single" else run_distributed
    spec = storage.read_json(join(features_uri, "feature_spec.json"))
    if config.task == "multiclass":
        counts = report["class_counts"]["train"]
        absent = [n for i, n in enumerate(spec["classes"]) if not counts.get(str(i))]
        if absent:
            raise TrainingError(
                f"class(es) {absent} have no rows in the training split "
                f"({join(features_uri, 'train')}): the model could never predict them"
            )
    imbalance = task_imbalance(
        config.task, report["class_counts"]["train"], train_cfg, len(spec.get("classes", []))
    )
    key = training_key(train_cfg, config.seed, features_digest(storage, run_uri))
    training_id = f"{key}-{new_run_id()}"
    model_uri = join(run_uri, "train", "models", training_id, MODEL_FILE)
    try:
        result = runner(config, train_cfg, run_uri, storage, imbalance, model_uri)
    except Exception as error:  # noqa: BLE001 - only XGBoost's own refusals are re-worded
        refusal = _xgboost_refusal(error)
        if refusal is None:
            raise
        raise TrainingError(f"XGBoost refused train.params: {refusal}") from None
    result.plan, result.plan_reason = plan, reason
    result.training_id = training_id
    result.valid_metric = stop_metric(config.task)
    result.seconds = round(time.perf_counter() - started, 3)
    storage.write_json(join(run_uri, "train", "_result.json"), asdict(result))
    return result


def main(
    config: Annotated[str, typer.Option(help="Path to the pipeline config YAML")],
    run: Annotated[str, typer.Option(help="Run URI with a features/ output")],
    plan: Annotated[str, typer.Option(help="auto | single | distributed")] = "",
) -> None:
    """Train a model on a run's features."""
    from jobs.summary import print_rows

    overrides = {"train.plan": plan} if plan else {}
    result = train_model(load_config(config, overrides), run)
    print_rows("train", {k: str(v) for k, v in asdict(result).items() if k != "history"})


if __name__ == "__main__":
    run_cli(main)
