"""Tune: Ray Tune over the same training function, then retrain the best and register it.

Search space, searcher (random or Optuna), ASHA early stopping, trial count, wall-time budget
and CPUs per trial all come from the config's `tune:` section. The experiment lives under the
run's storage, so an interrupted search resumes with `Tuner.restore`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Annotated

import numpy as np
import typer
import xgboost as xgb

from jobs.boosting import KNOWN_PARAMS, apply_imbalance, load_splits, xgb_params
from jobs.config import Config, TuneConfig, load_config
from jobs.entrypoint import run_cli
from jobs.errors import TrainingError
from jobs.ray_runtime import init_ray
from jobs.storage import Storage, join

REPORT_EVERY = 5  # divides ASHA's rungs for the default grace_period (10) and factor (3)


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
    table: list[dict]


def search_space(tune_cfg: TuneConfig) -> dict:
    """Config distributions -> Ray Tune sample domains; names are checked against XGBoost's."""
    from ray import tune

    unknown = sorted(set(tune_cfg.space) - KNOWN_PARAMS)
    if unknown:
        raise TrainingError(f"unknown hyperparameter(s) {unknown} in tune.space")
    space = {}
    for name, spec in tune_cfg.space.items():
        if len(spec) != 1:
            raise TrainingError(
                f"tune.space.{name}: give exactly one distribution, got {list(spec)}"
            )
        ((kind, args),) = spec.items()
        if kind == "choice":
            space[name] = tune.choice(args)
        elif kind == "randint":
            space[name] = tune.randint(int(args[0]), int(args[1]) + 1)
        else:
            space[name] = getattr(tune, kind)(float(args[0]), float(args[1]))
    return space


class _ReportEvery(xgb.callback.TrainingCallback):
    """Reports the validation metric to Tune every `every` rounds and at the end.

    ASHA only looks at its rungs (grace_period x reduction_factor^k rounds), so reporting every
    round bought nothing; each report costs a round trip to the Tune driver.
    """

    def __init__(self, metric: str, every: int):
        self.metric, self.every, self.last = metric, every, None

    def _report(self, model) -> None:
        from ray import tune

        tune.report({f"valid_{self.metric}": self.last, "rounds": model.num_boosted_rounds()})

    def after_iteration(self, model, epoch, evals_log) -> bool:
        self.last = float(evals_log["valid"][self.metric][-1])
        if model.num_boosted_rounds() % self.every == 0:
            self._report(model)
        return False

    def after_training(self, model):
        if self.last is not None and model.num_boosted_rounds() % self.every:
            self._report(model)
        return model


def _trial(params: dict, data: dict, base: dict, rounds: int, early: int, metric: str) -> None:
    dtrain = xgb.QuantileDMatrix(data["x_train"], data["y_train"], weight=data["weights"])
    dvalid = xgb.QuantileDMatrix(data["x_valid"], data["y_valid"], ref=dtrain)
    xgb.train(
        {**base, **params},
        dtrain,
        num_boost_round=rounds,
        evals=[(dvalid, "valid")],
        early_stopping_rounds=early,
        callbacks=[_ReportEvery(metric, REPORT_EVERY)],
        verbose_eval=False,
    )


def _tuner(config: Config, experiment: tuple, trainable, restore: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tune_cfg = config.tune
    path, fs = experiment
    full_path = join(path, "experiment")
    if restore and tune.Tuner.can_restore(full_path, storage_filesystem=fs):
        return tune.Tuner.restore(full_path, trainable, resume_errored=True, storage_filesystem=fs)
    metric, mode = f"valid_{tune_cfg.metric}", ("min" if tune_cfg.metric == "logloss" else "max")
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
            name="experiment", storage_path=path, storage_filesystem=fs, verbose=0
        ),
    )


def tune_model(
    config: Config, run_uri: str, storage: Storage | None = None, restore: bool = True
) -> TuneResult:
    """Searches hyperparameters on the run's train/valid splits; returns the best."""
    from ray import tune

    storage = storage or Storage(config.s3)
    init_ray(config)
    started = time.perf_counter()
    tune_cfg = config.tune
    search_space(tune_cfg)  # fail on bad names before loading data
    splits = load_splits(storage, run_uri, config)
    x_valid, y_valid, imbalance = splits.x_valid, splits.y_valid, splits.imbalance
    # Trials optimise the same objective training will: weights or down-sampling included.
    x_train, y_train, weights = apply_imbalance(
        splits.x_train, splits.y_train, imbalance, config.seed
    )
    base = xgb_params(config.train, config.seed, max(1, int(tune_cfg.cpus_per_trial)), imbalance)
    base["eval_metric"] = [tune_cfg.metric]
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            data={
                "x_train": x_train,
                "y_train": y_train,
                "weights": weights,
                "x_valid": x_valid,
                "y_valid": y_valid,
            },
            base=base,
            rounds=tune_cfg.num_boost_round,
            early=config.train.early_stopping_rounds,
            metric=tune_cfg.metric,
        ),
        {"cpu": tune_cfg.cpus_per_trial},
    )
    experiment_uri = join(run_uri, "tune")
    fs, path = storage.filesystem(experiment_uri)
    grid = _tuner(config, (path, fs), trainable, restore).fit()
    metric = f"valid_{tune_cfg.metric}"
    best_of = max if tune_cfg.metric != "logloss" else min
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
        raise TrainingError(f"no Tune trial reported {metric}; see {experiment_uri}")
    best = (max if best_of is max else min)(rows, key=lambda row: row["best"])
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
        seconds=round(time.perf_counter() - started, 3),
        experiment_uri=experiment_uri,
        results_uri=join(experiment_uri, "results.json"),
        table=rows,
    )
    storage.write_json(result.results_uri, asdict(result))
    return result


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
    for row in sorted(result.table, key=lambda r: -r["best"])[:20]:
        table.add_row(
            *[f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        )
    console.print(table)
    console.print(
        f"best {result.metric}={result.best_score:.4f} with {result.best_params}; "
        f"results: {result.results_uri}"
    )


def main(
    config: Annotated[str, typer.Option(help="Pipeline config YAML")],
    run: Annotated[str, typer.Option(help="Run URI with a features/ output")],
    fresh: Annotated[bool, typer.Option(help="Start over instead of resuming")] = False,
) -> None:
    """Tune hyperparameters, then retrain with the best, evaluate and register (gated)."""
    from jobs.pipeline import finish_run

    loaded = load_config(config)
    result = tune_model(loaded, run, restore=not fresh)
    print_results(result)
    finish_run(
        loaded,
        run,
        params_override=result.best_params,
        extra_lineage={"tune": {k: v for k, v in asdict(result).items() if k != "table"}},
    )


if __name__ == "__main__":
    run_cli(main)
