"""The single plan (one Ray task with every CPU of a node) and what both plans share:
progress reporting, storage checkpoints and the fit summary. The distributed plan (Ray Train
workers) is in `jobs.train_distributed`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import ray
import xgboost as xgb

from jobs.boosting import (
    ResumableEarlyStopping,
    TrainResult,
    apply_imbalance,
    checkpoint_uri,
    features_digest,
    fit_booster,
    load_booster,
    load_splits,
    save_booster,
    xgb_params,
)
from jobs.config import Config, TrainConfig
from jobs.errors import TrainingError
from jobs.progress import ProgressBoard, bar, follow, quiet
from jobs.storage import Storage, join

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


def finish_summary(
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
    model, summary = finish_summary(booster, stopper, resumed, len(y_train))
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
