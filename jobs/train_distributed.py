"""The distributed plan: Ray Train workers, each reading its own shard of the features, with
periodic and just-in-time (preemption) checkpoints."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import ray
import xgboost as xgb

from jobs.boosting import (
    MODEL_FILE,
    ResumableEarlyStopping,
    TrainResult,
    apply_imbalance,
    features_digest,
    fit_booster,
    read_shard,
    save_booster,
    to_matrix,
    training_key,
    xgb_params,
)
from jobs.config import Config, TrainConfig
from jobs.interruptions import interruption_ledger
from jobs.preemption import JustInTimeCheckpoint
from jobs.storage import Storage, join
from jobs.train_plans import ReportProgress, finish_summary, following, progress_board

STOPPER_FILE = "early_stopping.json"
POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 0.05  # Ray's default 2 s; init_ray's 0.2


class ReportEvery(xgb.callback.TrainingCallback):
    """Reports to Ray Train only every `every` rounds, with a checkpoint from rank 0 (Ray's
    RayTrainReportCallback reports every round, and each report may wait for a poll)."""

    def __init__(self, every: int, stopper: ResumableEarlyStopping):
        self.every, self.stopper = every, stopper

    def after_iteration(self, model, epoch, evals_log) -> bool:
        if model.num_boosted_rounds() % self.every == 0:
            report(model, evals_log, self.stopper)
        return False


def report(
    model: xgb.Booster, evals_log: dict, stopper: ResumableEarlyStopping, extra: dict | None = None
) -> None:
    import ray.train

    metrics = {f"valid-{k}": float(v[-1]) for k, v in evals_log.get("valid", {}).items()}
    # `extra` (the final summary) wins: its `rounds` counts every round trained, while the
    # final model is cut back to the best round.
    metrics.update({"rounds": model.num_boosted_rounds(), **(extra or {})})
    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as folder:
            model.save_model(Path(folder, MODEL_FILE))
            Path(folder, STOPPER_FILE).write_text(json.dumps(stopper.state()))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    else:
        ray.train.report(metrics)


def absolute(uri: str) -> str:
    """A local path resolved against the driver's folder; URIs with a scheme unchanged."""
    return uri if "://" in uri else str(Path(uri).resolve())


def _worker_loop(loop_config: dict) -> None:
    import ray.train

    names, label, train = loop_config["names"], loop_config["label"], loop_config["train"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    def shard(split: str):
        uri = join(loop_config["features_uri"], split)
        table = read_shard(loop_config["storage"], uri, [*names, label], rank, world)
        return to_matrix(table, label, names)

    start, resumed, state = None, 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            start = xgb.Booster(model_file=str(Path(folder, MODEL_FILE)))
            if Path(folder, STOPPER_FILE).exists():
                state = json.loads(Path(folder, STOPPER_FILE).read_text())
        resumed = start.num_boosted_rounds()
    ledger = loop_config.get("ledger")
    if rank == 0 and ledger is not None:  # before the shards: an attempt lost reading them counts
        ledger.start.remote(resumed)
    x_train, y_train = shard("train")
    x_valid, y_valid = shard("valid")
    x_train, y_train, weights = apply_imbalance(
        x_train, y_train, loop_config["imbalance"], loop_config["seed"] + rank
    )
    dtrain = xgb.DMatrix(x_train, y_train, weight=weights, feature_names=names)
    dvalid = xgb.DMatrix(x_valid, y_valid, feature_names=names)
    stopper = ResumableEarlyStopping(train.early_stopping_rounds, state=state)
    callbacks = [ReportEvery(train.checkpoint_every, stopper)]
    callbacks.append(
        JustInTimeCheckpoint(
            train.preemption_check_every,
            rank,
            ledger,
            lambda model, evals_log: report(model, evals_log, stopper),
            train.checkpoint_every,
        )
    )
    if rank == 0 and loop_config.get("board") is not None:
        callbacks.append(ReportProgress(loop_config["board"]))
    booster, history = fit_booster(
        dtrain, dvalid, loop_config["params"], train, callbacks, start, stopper
    )
    model, summary = finish_summary(booster, stopper, resumed, len(y_train))
    report(model, history, stopper, {**summary, "final": 1})


def _trainer_class():
    """Ray's XGBoostTrainer less two actors that cost a Python process (2-4 CPU-s) per fit: Ray
    Data's DatasetManager (workers read their own shards) and the PlacementGroupCleaner (frees
    the group if the controller dies but the driver lives on; the driver's job frees it too)."""
    from ray.train.v2._internal.callbacks import datasets
    from ray.train.v2._internal.callbacks import placement_group_callback as pg
    from ray.train.xgboost import XGBoostTrainer

    class Trainer(XGBoostTrainer):
        def _create_default_callbacks(self):  # Ray 2.60's hook; a private method
            drop = (datasets.DatasetsCallback, pg.PlacementGroupCleanerCallback)
            return [c for c in super()._create_default_callbacks() if not isinstance(c, drop)]

    return Trainer


def run_distributed(
    config: Config,
    train: TrainConfig,
    run_uri: str,
    storage: Storage,
    imbalance: dict,
    model_uri: str,
) -> TrainResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig

    spec = storage.read_json(join(run_uri, "features", "feature_spec.json"))
    storage_uri = join(run_uri, "train", "ray_train")
    fs, path = storage.filesystem(storage_uri)
    board = progress_board("starting the worker group")
    ledger = interruption_ledger()
    trainer = _trainer_class()(
        _worker_loop,
        train_loop_config={
            "names": spec["feature_names"],
            "label": config.features.label,
            "train": train,
            "imbalance": imbalance,
            "seed": config.seed,
            "params": xgb_params(train, config.seed, int(train.cpus_per_worker), imbalance),
            "board": board,
            "ledger": ledger,
            "storage": storage,
            # Workers run in their own folder: a relative local path must be made absolute here.
            "features_uri": absolute(join(run_uri, "features")),
        },
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": train.cpus_per_worker,
                **({"GPU": train.gpus_per_worker} if train.gpus_per_worker else {}),
            },
            label_selector=dict(train.label_selector) or None,
        ),
        run_config=RunConfig(
            name=f"xgboost-{training_key(train, config.seed, features_digest(storage, run_uri))}",
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(
                max_failures=train.max_failures, max_preemption_failures=train.max_preemptions
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    # The controller drains reports once per poll; Ray Train reads the interval here at fit().
    os.environ[POLL_ENV] = str(min(POLL_S, float(os.environ.get(POLL_ENV, POLL_S))))
    started = time.perf_counter()
    description = f"train (Ray Train, {train.num_workers} worker{'s' * (train.num_workers > 1)})"
    try:
        with following(board, description, total=train.num_boost_round):
            result = trainer.fit()
        try:
            interruptions = ray.get(ledger.summary.remote(), timeout=60)
        except Exception as error:  # noqa: BLE001 - bookkeeping must not discard a good fit
            interruptions = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
    finally:
        for actor in (board, ledger):
            if actor is not None:
                ray.kill(actor)
    metrics = result.metrics
    with result.checkpoint.as_directory() as folder:
        booster = xgb.Booster(model_file=str(Path(folder, MODEL_FILE)))
    save_booster(storage, booster, model_uri)
    return TrainResult(
        model_uri=model_uri,
        plan="distributed",
        plan_reason="",
        params=xgb_params(train, config.seed, None, imbalance),
        imbalance=imbalance,
        best_iteration=int(metrics["best_iteration"]),
        rounds=int(metrics["rounds"]),
        valid_aucpr=float(metrics["valid_aucpr"]),
        resumed_from_round=int(metrics["resumed_from_round"]),
        train_rows=(
            int(metrics["train_rows"]) * train.num_workers  # rank 0's sample, scaled
            if "negatives_kept_fraction" in imbalance
            else storage.read_json(join(run_uri, "features", "_report.json"))["rows"]["train"]
        ),
        seconds=0.0,
        cpus=train.num_workers * train.cpus_per_worker,
        checkpoint_uri=storage_uri,
        history={"fit_seconds": round(time.perf_counter() - started, 3)},
        interruptions=interruptions,
    )
