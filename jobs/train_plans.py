"""The two ways `jobs.train` runs the same training function: one task, or Ray Train workers."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import ray
import xgboost as xgb

from jobs.boosting import (
    MODEL_FILE,
    ResumableEarlyStopping,
    TrainResult,
    apply_imbalance,
    checkpoint_uri,
    features_digest,
    fit_booster,
    load_booster,
    load_splits,
    save_booster,
    to_matrix,
    training_key,
    xgb_params,
)
from jobs.config import Config, TrainConfig
from jobs.errors import TrainingError
from jobs.progress import ProgressBoard, bar, follow, quiet
from jobs.storage import Storage, join

STOPPER_FILE = "early_stopping.json"
PROGRESS_EVERY_S = 1.0


class ReportProgress(xgb.callback.TrainingCallback):
    """Tells a `ProgressBoard` the boosting round and the latest validation metric, about once
    a second and after the last round. `report.remote` does not wait for the actor, so a round
    costs no more than a clock read."""

    def __init__(self, board, every_s: float = PROGRESS_EVERY_S):
        self.board, self.every_s = board, every_s
        self.last, self.evals_log = 0.0, {}

    def send(self, model) -> None:
        valid = self.evals_log.get("valid", {})
        status = ""
        if valid:
            metric = list(valid)[-1]  # the metric early stopping watches
            status = f"valid {metric} {float(valid[metric][-1]):.4f}"
        self.board.report.remote(model.num_boosted_rounds(), status)
        self.last = time.monotonic()

    def after_iteration(self, model, epoch, evals_log) -> bool:
        self.evals_log = evals_log
        if time.monotonic() - self.last >= self.every_s:
            self.send(model)
        return False

    def after_training(self, model):
        self.send(model)
        return model


def progress_board(status: str = "starting"):
    """A board for the training progress bar, or None when progress is off."""
    if quiet():
        return None
    board = ProgressBoard.remote()
    board.report.remote(0, status)
    return board


@contextmanager
def following(board, description: str, total: float) -> Iterator[None]:
    """Shows what `board` reports while the body runs (Ray Train's `fit()` blocks the driver,
    so a thread polls the board)."""
    if board is None:
        yield
        return
    done = threading.Event()

    def poll() -> None:
        with bar(description, total=total) as update:
            finished = False
            while not finished:
                finished = done.wait(0.5)
                try:
                    completed, status = ray.get(board.read.remote(), timeout=10)
                except Exception:  # noqa: BLE001 - the bar is a courtesy; training decides
                    return
                update(completed=completed, status=status)

    thread = threading.Thread(target=poll, name="rayline-train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=15)


class StorageCheckpoint(xgb.callback.TrainingCallback):
    """Every `every` rounds, writes the booster to storage, then moves the `latest` pointer
    (which also carries the early-stopping state)."""

    def __init__(self, storage: Storage, uri: str, every: int, stopper: ResumableEarlyStopping):
        self.storage, self.uri, self.every, self.stopper = storage, uri, every, stopper

    def after_iteration(self, model, epoch, evals_log) -> bool:
        rounds = model.num_boosted_rounds()
        if rounds % self.every == 0:
            target = join(self.uri, f"round-{rounds:06d}.ubj")
            save_booster(self.storage, model, target)
            pointer = {"round": rounds, "uri": target, "early_stopping": self.stopper.state()}
            self.storage.write_json(join(self.uri, "latest.json"), pointer)
        return False


def latest_checkpoint(storage: Storage, uri: str) -> tuple[xgb.Booster | None, dict]:
    """The booster the `latest` pointer names and its early-stopping state; (None, {}) if there
    is no pointer; an error if it names a checkpoint that is gone (a silent restart from
    round 0 would hide that)."""
    pointer_uri = join(uri, "latest.json")
    if not storage.exists(pointer_uri):
        return None, {}
    pointer = storage.read_json(pointer_uri)
    if not storage.exists(pointer["uri"]):
        raise TrainingError(
            f"checkpoint pointer {pointer_uri} names {pointer['uri']}, which is missing"
        )
    return load_booster(storage, pointer["uri"]), pointer.get("early_stopping", {})


def _finish(
    booster: xgb.Booster, stopper: ResumableEarlyStopping, resumed: int, rows: int
) -> tuple[xgb.Booster, dict]:
    rounds = booster.num_boosted_rounds()
    best = stopper.best_iteration if stopper.best_iteration >= 0 else rounds - 1
    return booster[: best + 1], {
        "best_iteration": best,
        "rounds": rounds,
        "valid_aucpr": float(stopper.best_score if stopper.best_score is not None else "nan"),
        "resumed_from_round": resumed,
        "train_rows": rows,
    }


@ray.remote(max_retries=0)
def _train_task(
    config: Config,
    train: TrainConfig,
    run_uri: str,
    storage: Storage,
    imbalance: dict,
    nthread: int,
    model_uri: str,
    board=None,
) -> dict:
    """The single plan: read the splits with pyarrow, train with every CPU of this task."""
    splits = load_splits(storage, run_uri, config)
    names = splits.names
    x_train, y_train, weights = apply_imbalance(
        splits.x_train, splits.y_train, imbalance, config.seed
    )
    params = xgb_params(train, config.seed, nthread, imbalance)
    dtrain = xgb.QuantileDMatrix(x_train, y_train, weight=weights, feature_names=names)
    dvalid = xgb.QuantileDMatrix(splits.x_valid, splits.y_valid, ref=dtrain, feature_names=names)
    checkpoints = checkpoint_uri(run_uri, train, config.seed, features_digest(storage, run_uri))
    start, state = latest_checkpoint(storage, checkpoints)
    resumed = start.num_boosted_rounds() if start is not None else 0
    stopper = ResumableEarlyStopping(train.early_stopping_rounds, state=state)
    callbacks = [StorageCheckpoint(storage, checkpoints, train.checkpoint_every, stopper)]
    if board is not None:
        callbacks.append(ReportProgress(board))
    booster, history = fit_booster(dtrain, dvalid, params, train, callbacks, start, stopper)
    model, summary = _finish(booster, stopper, resumed, len(y_train))
    save_booster(storage, model, model_uri)
    return {**summary, "params": params, "history": history, "checkpoint_uri": checkpoints}


def _selected(node: dict, selector: dict[str, str]) -> bool:
    """Whether a node's labels match the plain `key: value` parts of a label selector (the
    operator forms, `!v` and `in(...)`, are left to Ray)."""
    labels = node.get("Labels", {})
    return all(
        labels.get(key) == value
        for key, value in selector.items()
        if not value.startswith(("!", "in(", "!in("))
    )


def run_single(
    config: Config,
    train: TrainConfig,
    run_uri: str,
    storage: Storage,
    imbalance: dict,
    model_uri: str,
) -> TrainResult:
    nodes = [n for n in ray.nodes() if n["Alive"] and _selected(n, train.label_selector)]
    largest = max((n["Resources"].get("CPU", 0) for n in nodes), default=1) or 1
    # All of one node's CPUs, but not more than are free now (Serve replicas may hold some).
    cpus = max(1, int(min(largest, ray.available_resources().get("CPU", 1))))
    task = _train_task.options(
        num_cpus=cpus,
        max_retries=train.max_failures,
        num_gpus=train.gpus_per_worker or None,
        label_selector=dict(train.label_selector) or None,
    )
    board = progress_board()
    ref = task.remote(config, train, run_uri, storage, imbalance, cpus, model_uri, board)
    if board is None:
        out = ray.get(ref)
    else:
        try:
            out = follow(ref, board, "train (one task)", total=train.num_boost_round)
        finally:
            ray.kill(board)
    return TrainResult(
        model_uri=model_uri,
        plan="single",
        plan_reason="",
        params=out["params"],
        imbalance=imbalance,
        best_iteration=out["best_iteration"],
        rounds=out["rounds"],
        valid_aucpr=out["valid_aucpr"],
        resumed_from_round=out["resumed_from_round"],
        train_rows=out["train_rows"],
        seconds=0.0,
        cpus=cpus,
        checkpoint_uri=out["checkpoint_uri"],
        history=out["history"],
    )


class ReportEvery(xgb.callback.TrainingCallback):
    """Reports to Ray Train only every `every` rounds, with a checkpoint from rank 0.

    Ray's RayTrainReportCallback reports metrics on every round; each report waits for the
    controller's poll, which cost about 2 s a round on small data.
    """

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
    metrics.update(extra or {}, rounds=model.num_boosted_rounds())
    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as folder:
            model.save_model(Path(folder, MODEL_FILE))
            Path(folder, STOPPER_FILE).write_text(json.dumps(stopper.state()))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    else:
        ray.train.report(metrics)


def _worker_loop(loop_config: dict) -> None:
    import ray.train

    names, label, train = loop_config["names"], loop_config["label"], loop_config["train"]
    rank = ray.train.get_context().get_world_rank()

    def shard(name: str):
        batches = ray.train.get_dataset_shard(name).iter_batches(
            batch_format="pyarrow", batch_size=None
        )
        return to_matrix(pa.concat_tables(list(batches)), label, names)

    x_train, y_train = shard("train")
    x_valid, y_valid = shard("valid")
    x_train, y_train, weights = apply_imbalance(
        x_train, y_train, loop_config["imbalance"], loop_config["seed"] + rank
    )
    dtrain = xgb.DMatrix(x_train, y_train, weight=weights, feature_names=names)
    dvalid = xgb.DMatrix(x_valid, y_valid, feature_names=names)
    start, resumed, state = None, 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            start = xgb.Booster(model_file=str(Path(folder, MODEL_FILE)))
            if Path(folder, STOPPER_FILE).exists():
                state = json.loads(Path(folder, STOPPER_FILE).read_text())
        resumed = start.num_boosted_rounds()
    stopper = ResumableEarlyStopping(train.early_stopping_rounds, state=state)
    callbacks = [ReportEvery(train.checkpoint_every, stopper)]
    if rank == 0 and loop_config.get("board") is not None:
        callbacks.append(ReportProgress(loop_config["board"]))
    booster, history = fit_booster(
        dtrain, dvalid, loop_config["params"], train, callbacks, start, stopper
    )
    model, summary = _finish(booster, stopper, resumed, len(y_train))
    report(model, history, stopper, {**summary, "final": 1})


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
    from ray.train.xgboost import XGBoostTrainer

    spec = storage.read_json(join(run_uri, "features", "feature_spec.json"))
    datasets = {}
    for split in ("train", "valid"):
        fs, path = storage.filesystem(join(run_uri, "features", split))
        # Materialize before the workers take their CPUs: read tasks must never starve.
        datasets[split] = ray.data.read_parquet(path, filesystem=fs).materialize()
    storage_uri = join(run_uri, "train", "ray_train")
    fs, path = storage.filesystem(storage_uri)
    board = progress_board("starting the worker group")
    trainer = XGBoostTrainer(
        _worker_loop,
        train_loop_config={
            "names": spec["feature_names"],
            "label": config.features.label,
            "train": train,
            "imbalance": imbalance,
            "seed": config.seed,
            "params": xgb_params(train, config.seed, int(train.cpus_per_worker), imbalance),
            "board": board,
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
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
    )
    started = time.perf_counter()
    workers = f"{train.num_workers} worker{'s' if train.num_workers != 1 else ''}"
    description = f"train (Ray Train, {workers})"
    try:
        with following(board, description, total=train.num_boost_round):
            result = trainer.fit()
    finally:
        if board is not None:
            ray.kill(board)
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
    )
