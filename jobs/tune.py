"""Tune: Ray Tune over the same training function, then retrain the best and register it.

Search space, searcher (random or Optuna), ASHA early stopping, trial count, wall-time and
dollar budgets (`jobs.tune_runtime`) and CPUs per trial all come from the config's `tune:`
section; the result says which of trials, time or budget stopped the search and what the
cluster spent meanwhile. The experiment lives under the
run's storage, so an interrupted search resumes with `Tuner.restore`.

That state is pickled, and unpickling runs code, so it is signed (`jobs.signing`: an HMAC with
a key that lives only where the driver runs) whenever `fit()` returns or is interrupted, and
verified before it is restored: state that does not match is never loaded. A new search (or
`--fresh`) deletes the old state first, so nothing left in the folder gets signed as ours.
While Tune runs, a progress bar counts trials finished, running and stopped early.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Annotated

import numpy as np
import typer

from jobs.boosting import apply_imbalance, load_splits, stop_metric, xgb_params
from jobs.config import LOWER_IS_BETTER, Config, TuneConfig, load_config
from jobs.entrypoint import run_cli
from jobs.errors import TrainingError
from jobs.progress import bar
from jobs.ray_runtime import init_ray
from jobs.signing import sign_tree, verify_tree
from jobs.storage import Storage, join
from jobs.tune_runtime import BudgetWatch, _rungs, _trial, _watch, budget_stopper


class TuneInterrupted(TrainingError):
    """The search was stopped (Ctrl+C / SIGINT); its state was saved and signed."""


@dataclass
class TuneResult:
    best_params: dict
    best_score: float
    metric: str
    trials: int
    trials_stopped_early: int
    seconds: float
    experiment_uri: str
    results_uri: str
    stopped_by: str  # "trials" (all of num_samples ran), "time" (time_budget_s) or "budget"
    budget_usd: float | None
    spent_usd: float | None  # the cluster's dollars while tuning; None when it cannot be priced
    spend_note: str | None  # why spent_usd is None
    table: list[dict]


def objective(config: Config) -> tuple[str, str]:
    """The XGBoost metric trials optimise (the config's, else the task's default) and its mode."""
    name = config.tune.metric or stop_metric(config.task)
    return name, ("min" if name in LOWER_IS_BETTER else "max")


def search_space(tune_cfg: TuneConfig) -> dict:
    """Config distributions -> Ray Tune sample domains (the config checked names and bounds
    when it was parsed, `config_checks.check_search`)."""
    from ray import tune

    space = {}
    for name, spec in tune_cfg.space.items():
        ((kind, args),) = spec.items()
        if kind == "choice":
            space[name] = tune.choice(args)
        elif kind == "randint":
            space[name] = tune.randint(int(args[0]), int(args[1]) + 1)
        else:
            space[name] = getattr(tune, kind)(float(args[0]), float(args[1]))
    return space


_progress: dict = {"update": None}  # the driver's bar while fit() runs; see _progress_callback


def _show_progress(trials: list, max_rounds: int) -> None:
    update = _progress["update"]
    if update is None:
        return
    counts = {"done": 0, "running": 0, "early": 0, "failed": 0}
    for trial in trials:
        if trial.status == "TERMINATED":
            counts["done"] += 1
            counts["early"] += (trial.last_result or {}).get("rounds", max_rounds) < max_rounds
        elif trial.status == "ERROR":
            counts["done"] += 1
            counts["failed"] += 1
        elif trial.status == "RUNNING":
            counts["running"] += 1
    status = f"{counts['running']} running, {counts['early']} stopped early"
    update(
        completed=counts["done"],
        status=status + f", {counts['failed']} failed" * bool(counts["failed"]),
    )


def _progress_callback(max_rounds: int):
    """A Tune callback that feeds the driver's progress bar (`_progress["update"]`).

    Tune pickles its callbacks into `tuner.pkl` and a restored search uses the unpickled ones,
    so the callback holds only `max_rounds`, pickles as a call to this function, and finds the
    bar through the module, not through its own state. Defined lazily: importing `ray.tune`
    costs ~1.4 s that `rayline --help` should not pay.
    """
    from ray.tune import Callback

    class TuneProgress(Callback):
        def __init__(self, max_rounds: int):
            self.max_rounds = max_rounds

        def __reduce__(self):
            return _progress_callback, (self.max_rounds,)

        def on_step_end(self, iteration: int, trials: list, **info) -> None:
            _show_progress(trials, self.max_rounds)

        def on_experiment_end(self, trials: list, **info) -> None:
            _show_progress(trials, self.max_rounds)

    return TuneProgress(max_rounds)


def _tuner(config: Config, experiment: tuple, trainable, restore: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tune_cfg = config.tune
    path, fs = experiment
    if restore:  # only after verify_tree accepted the state: this unpickles it
        full_path = join(path, "experiment")
        return tune.Tuner.restore(full_path, trainable, resume_errored=True, storage_filesystem=fs)
    name, mode = objective(config)
    metric = f"valid_{name}"
    scheduler = (
        ASHAScheduler(
            time_attr="rounds",
            max_t=tune_cfg.num_boost_round,
            grace_period=tune_cfg.grace_period,
            reduction_factor=tune_cfg.reduction_factor,
        )
        if tune_cfg.asha
        else FIFOScheduler()
    )
    search_alg = None
    if tune_cfg.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search_alg = ConcurrencyLimiter(OptunaSearch(seed=config.seed), tune_cfg.max_concurrent)
    return tune.Tuner(
        trainable,
        param_space=search_space(tune_cfg),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=tune_cfg.num_samples,
            scheduler=scheduler,
            search_alg=search_alg,
            max_concurrent_trials=tune_cfg.max_concurrent,
            time_budget_s=tune_cfg.time_budget_s,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name="experiment",
            storage_path=path,
            storage_filesystem=fs,
            verbose=0,
            stop=budget_stopper(),  # finds the current BudgetWatch through jobs.tune_runtime
            callbacks=[_progress_callback(tune_cfg.num_boost_round)],
        ),
    )


def tune_model(
    config: Config, run_uri: str, storage: Storage | None = None, restore: bool = True
) -> TuneResult:
    """Searches hyperparameters on the run's train/valid splits; returns the best.

    With `restore`, a search found under the run resumes, but only if its state matches the
    signature written when it stopped; otherwise this raises `TrainingError` without loading
    it. Without `restore` (`--fresh`) the old state is deleted. Raises `TuneInterrupted`
    (after saving and signing the state) when the search was stopped by SIGINT.
    """
    from ray import tune

    storage = storage or Storage(config.s3)
    tune_cfg = config.tune
    name, mode = objective(config)
    experiment_uri = join(run_uri, "tune")
    state_uri = join(experiment_uri, "experiment")
    signature_uri = join(experiment_uri, "experiment.sig.json")
    fs, path = storage.filesystem(experiment_uri)
    resume = restore and tune.Tuner.can_restore(join(path, "experiment"), storage_filesystem=fs)
    if resume:
        _check_signature(storage, state_uri, signature_uri)
    else:  # a new search starts from an empty folder, so we never sign what someone left there
        storage.delete(state_uri)
        storage.delete(signature_uri)
    started, watch = time.perf_counter(), BudgetWatch(tune_cfg.budget_usd, time.time())
    splits = load_splits(storage, run_uri, config)
    init_ray(config)
    watch.over()  # with a budget, the first GCS read: warns now if it cannot bind
    imbalance = splits.imbalance
    # Trials optimise the same objective training will: weights or down-sampling included.
    x_train, y_train, weights = apply_imbalance(
        splits.x_train, splits.y_train, imbalance, config.seed
    )
    base = xgb_params(config.train, config.seed, max(1, int(tune_cfg.cpus_per_trial)), imbalance)
    base["eval_metric"] = [name]
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            data={  # once in the object store; "token" names it for the trials' DMatrix cache
                **{"x_train": x_train, "y_train": y_train, "weights": weights},
                **{"x_valid": splits.x_valid, "y_valid": splits.y_valid},
                "token": f"{state_uri}@{time.time()}",
            },
            base=base,
            rounds=tune_cfg.num_boost_round,
            early=config.train.early_stopping_rounds,
            metric=name,
            rungs=_rungs(tune_cfg),
        ),
        {"cpu": tune_cfg.cpus_per_trial},
    )
    with bar("tune: trials", total=tune_cfg.num_samples) as update:
        _progress["update"], _watch["current"] = update, watch
        try:  # on SIGINT Tune stops its trials, saves its state and returns normally
            grid, stopped = _fit(_tuner(config, (path, fs), trainable, resume))
            spend = watch.summary()  # before signing and reading results: what tuning cost
        finally:
            _progress["update"], _watch["current"] = None, None
            if storage.exists(state_uri):
                sign_tree(storage, state_uri, signature_uri)
    finished = grid.num_terminated + grid.num_errors
    if stopped or finished < len(grid):
        raise TuneInterrupted(
            f"tune interrupted with {finished} trial(s) finished; the search state is saved "
            f"and signed at {state_uri}; run the same command to resume"
        )
    metric = f"valid_{name}"
    best_of = max if mode == "max" else min
    rows = []
    for result in grid:
        if result.metrics_dataframe is None or metric not in result.metrics_dataframe:
            continue
        history = result.metrics_dataframe
        rows.append(
            {
                **{k: result.config[k] for k in tune_cfg.space},
                "best": float(best_of(history[metric])),
                "rounds": int(history["rounds"].max()),
            }
        )
    if not rows:
        spent = f" before tune.budget_usd={tune_cfg.budget_usd} was spent" * watch.reached
        raise TrainingError(f"no Tune trial reported {metric}{spent}; see {experiment_uri}")
    best = best_of(rows, key=lambda row: row["best"])
    seconds = time.perf_counter() - started
    over_time = tune_cfg.time_budget_s is not None and seconds >= tune_cfg.time_budget_s
    stopped_by = "budget" if watch.reached else "time" if over_time else "trials"
    result = TuneResult(
        best_params={
            k: (int(v) if isinstance(v, np.integer) else v)
            for k, v in best.items()
            if k in tune_cfg.space
        },
        best_score=best["best"],
        metric=metric,
        trials=len(rows),
        trials_stopped_early=sum(r["rounds"] < tune_cfg.num_boost_round for r in rows),
        seconds=round(seconds, 3),
        experiment_uri=experiment_uri,
        results_uri=join(experiment_uri, "results.json"),
        stopped_by=stopped_by,
        **spend,
        table=rows,
    )
    storage.write_json(result.results_uri, asdict(result))
    return result


def _check_signature(storage: Storage, state_uri: str, signature_uri: str) -> None:
    """Refuses (one line, exit 2) to restore Tune state that does not match its signature."""
    problem = verify_tree(storage, state_uri, signature_uri)
    if problem:
        raise TrainingError(
            f"refusing to restore the Tune experiment {state_uri}: it does not match the "
            f"signature rayline wrote when it stopped ({problem}), so it may have been written "
            "by someone else and loading it could run their code; re-run with --fresh to "
            "delete it and start a new search"
        )


def _fit(tuner) -> tuple:
    """`tuner.fit()`, and whether a stop signal (SIGINT, SIGUSR1) ended it early.

    Tune swaps in its own SIGINT handler for the run, puts the previous one back only when it
    fires, and leaves its own installed after a normal run (so a later Ctrl+C, during the
    retraining, would only log a warning). So: the previous handler being back means that Tune
    was signalled; either way the previous handler is restored.
    """
    watch = threading.current_thread() is threading.main_thread() and not int(
        os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")
    )
    before = signal.getsignal(signal.SIGINT)
    stopped = False
    try:
        grid = tuner.fit()
    finally:
        if watch:
            stopped = signal.getsignal(signal.SIGINT) is before
            signal.signal(signal.SIGINT, before)
    return grid, stopped


def print_results(result: TuneResult) -> None:
    from rich.table import Table

    from jobs.summary import console

    table = Table(
        title=f"tune: {result.trials} trials in {result.seconds:.1f} s "
        f"({result.trials_stopped_early} stopped early)"
    )
    columns = list(result.table[0])
    for column in columns:
        table.add_column(column)
    lower_is_better = result.metric.removeprefix("valid_") in LOWER_IS_BETTER
    for row in sorted(result.table, key=lambda r: r["best"], reverse=not lower_is_better)[:20]:
        table.add_row(
            *[f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        )
    console.print(table)
    spent = "unknown" if result.spent_usd is None else f"${result.spent_usd:.4f}"
    budget = "" if result.budget_usd is None else f" of ${result.budget_usd:g}"
    console.print(
        f"best {result.metric}={result.best_score:.4f} with {result.best_params}; stopped by "
        f"{result.stopped_by}; spent {spent}{budget}; results: {result.results_uri}"
    )


def main(
    config: Annotated[str, typer.Option(help="Pipeline config YAML")],
    run: Annotated[str, typer.Option(help="Run URI with a features/ output")],
    fresh: Annotated[
        bool,
        typer.Option(help="Delete the saved search (if any) and start over instead of resuming"),
    ] = False,
) -> None:
    """Tune hyperparameters, then retrain with the best, evaluate and register (gated)."""
    from jobs.pipeline import finish_run

    loaded = load_config(config)
    try:
        result = tune_model(loaded, run, restore=not fresh)
    except TuneInterrupted as interrupted:
        print(str(interrupted), file=sys.stderr)
        raise typer.Exit(130) from None
    print_results(result)
    finish_run(
        loaded,
        run,
        params_override=result.best_params,
        extra_lineage={"tune": {k: v for k, v in asdict(result).items() if k != "table"}},
    )


if __name__ == "__main__":
    # Run the importable module's `main`, not this `__main__` copy: Tune pickles the progress
    # callback into tuner.pkl, which must refer to `jobs.tune` (and its bar) by name.
    from jobs import tune

    run_cli(tune.main)
