"""Ray Tune (with and without ASHA) vs plain sequential Optuna: 16 trials on the same data.

    python -m benchmarks.tune [--rows 300000] [--trials 16] [--rounds 50] [--repeat 3]

Reports wall time and the best validation PR-AUC of each. Ray start-up is timed separately.
Each repetition runs plain Optuna and then every Tune variant, so each ratio compares runs made
under the same load (another process may share the machine); the table shows medians over the
repetitions and the 1-minute load average is recorded with every run.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Annotated

import optuna
import typer
import xgboost as xgb

from benchmarks.train import ROOT, prepared_run
from jobs.boosting import load_splits, xgb_params
from jobs.ray_runtime import init_ray
from jobs.storage import Storage
from jobs.tune import tune_model


def plain_optuna(config, run_uri: str, trials: int) -> dict:
    """Sequential Optuna with all cores per trial, the same space, rounds and early stopping."""
    started = time.perf_counter()
    splits = load_splits(Storage(), run_uri, config)
    x_train, y_train, x_valid, y_valid = (
        splits.x_train,
        splits.y_train,
        splits.x_valid,
        splits.y_valid,
    )
    imbalance = splits.imbalance
    base = {
        **xgb_params(config.train, config.seed, os.cpu_count(), imbalance),
        "eval_metric": ["aucpr"],
    }
    dtrain = xgb.QuantileDMatrix(x_train, y_train)
    dvalid = xgb.QuantileDMatrix(x_valid, y_valid, ref=dtrain)

    def objective(trial: optuna.Trial) -> float:
        params = {}
        for name, spec_ in config.tune.space.items():
            ((kind, args),) = spec_.items()
            if kind == "choice":
                params[name] = trial.suggest_categorical(name, args)
            elif kind == "randint":
                params[name] = trial.suggest_int(name, int(args[0]), int(args[1]))
            else:
                params[name] = trial.suggest_float(name, args[0], args[1], log=kind == "loguniform")
        booster = xgb.train(
            {**base, **params},
            dtrain,
            num_boost_round=config.tune.num_boost_round,
            evals=[(dvalid, "valid")],
            early_stopping_rounds=config.train.early_stopping_rounds,
            verbose_eval=False,
        )
        return float(booster.best_score)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=trials)
    return {"seconds": time.perf_counter() - started, "best": study.best_value, "trials": trials}


def main(
    rows: Annotated[int, typer.Option(help="Transactions to generate")] = 300_000,
    trials: Annotated[int, typer.Option(help="Trials per search")] = 16,
    rounds: Annotated[int, typer.Option(help="Max boosting rounds per trial")] = 50,
    repeat: Annotated[int, typer.Option(help="Repetitions (medians are reported)")] = 3,
    base: Annotated[str, typer.Option(help="Scratch folder")] = "/tmp/rayline-bench/train",
    out: Annotated[
        str | None, typer.Option(help="Results JSON (default benchmarks/results/)")
    ] = None,
) -> None:
    """Benchmark Ray Tune against sequential Optuna."""
    from rich.table import Table

    from jobs.summary import console

    ray_start = init_ray(None)
    overrides = {
        "tune.num_samples": trials,
        "tune.num_boost_round": rounds,
        "tune.max_concurrent": 2,
        "tune.cpus_per_trial": 1,
    }
    variants = {
        "ray tune random, no ASHA": {"tune.asha": False, "tune.search": "random"},
        "ray tune random + ASHA": {"tune.asha": True, "tune.search": "random"},
        "ray tune optuna + ASHA": {"tune.asha": True, "tune.search": "optuna"},
        "ray tune optuna + ASHA, 1 trial x 2 CPUs": {
            **{"tune.asha": True, "tune.search": "optuna"},
            **{"tune.max_concurrent": 1, "tune.cpus_per_trial": 2},
        },
    }
    results = {
        "command": " ".join(sys.argv),
        "date": date.today().isoformat(),
        "cpus": os.cpu_count(),
        "ray_start_seconds": round(ray_start, 2),
        "runs": {},
    }
    config, run_uri = prepared_run(rows, Path(base), overrides)
    results["load_before"] = os.getloadavg()
    for _ in range(repeat):
        load = os.getloadavg()[0]
        plain = plain_optuna(config, run_uri, trials)
        results["runs"].setdefault("plain optuna, sequential", []).append({**plain, "load": load})
        for name, extra in variants.items():
            variant, _ = prepared_run(rows, Path(base), {**overrides, **extra})
            load = os.getloadavg()[0]
            result = tune_model(variant, run_uri, restore=False)
            results["runs"].setdefault(name, []).append(
                {
                    "seconds": result.seconds,
                    "vs_optuna": result.seconds / plain["seconds"],
                    "best": result.best_score,
                    "trials": result.trials,
                    "stopped_early": result.trials_stopped_early,
                    "load": load,
                }
            )
    results["load_after"] = os.getloadavg()
    table = Table(
        title=f"tune: {trials} trials, {rows:,} transactions, medians of {repeat} "
        "(Ray start excluded)"
    )
    for column in ("search", "wall s", "vs optuna", "best valid PR-AUC", "stopped early", "load"):
        table.add_column(column)
    for name, runs in results["runs"].items():
        median = {
            key: statistics.median(run[key] for run in runs)
            for key in ("seconds", "vs_optuna", "best", "stopped_early", "load")
            if key in runs[0]
        }
        results.setdefault("medians", {})[name] = median
        table.add_row(
            name,
            f"{median['seconds']:.1f}",
            f"{median.get('vs_optuna', 1):.2f}x",
            f"{median['best']:.4f}",
            f"{median['stopped_early']:g}" if "stopped_early" in median else "-",
            f"{median['load']:.1f}",
        )
    console.print(table)
    out = Path(out or ROOT / "benchmarks" / "results" / f"tune-{date.today():%Y%m%d}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    console.print(f"Ray start (excluded): {ray_start:.1f} s; results: {out}")


if __name__ == "__main__":
    typer.run(main)
