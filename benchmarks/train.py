"""rayline train vs plain `xgboost.train` on the same generated rows, in one process run.

    python -m benchmarks.train [--rows 2000000] [--small-rows 20000] [--plan auto]

Both sides read the same train/valid parquet splits (made by rayline's own ingest + features
on generated data), use the same parameters and rounds, and write the model. Ray start-up is
timed separately and excluded from rayline's time, as the issue asks.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
import xgboost as xgb

from jobs.boosting import load_splits, xgb_params
from jobs.config import load_config
from jobs.data import generate
from jobs.features import build_features
from jobs.ingest import ingest
from jobs.ray_runtime import init_ray
from jobs.storage import Storage, join
from jobs.train import train_model

ROOT = Path(__file__).resolve().parents[1]


def prepared_run(rows: int, base: Path, config_overrides: dict):
    """Generates data and runs ingest + features once per size; later runs reuse them."""
    data, storage = base / f"data-{rows}", base / f"artifacts-{rows}"
    config = load_config(
        ROOT / "configs" / "fraud.yaml",
        {
            "storage": str(storage),
            **{
                f"sources.{s}.uri": str(data / s)
                for s in ("transactions", "customers", "merchants")
            },
            **config_overrides,
        },
    )
    run_uri = str(storage / "runs" / "bench")
    if not (storage / "runs" / "bench" / "features" / "_report.json").exists():
        if not (data / "transactions").exists():
            generate(str(data), rows=rows, days=30)
        init_ray(config)
        ingest(config, run_uri)
        build_features(config, run_uri)
    return config, run_uri


def plain_xgboost(config, run_uri: str) -> dict:
    """What a user would write by hand: read parquet, QuantileDMatrix, xgboost.train, save."""
    started = time.perf_counter()
    splits = load_splits(Storage(), run_uri, config)
    params = xgb_params(config.train, config.seed, os.cpu_count(), splits.imbalance)
    dtrain = xgb.QuantileDMatrix(splits.x_train, splits.y_train)
    dvalid = xgb.QuantileDMatrix(splits.x_valid, splits.y_valid, ref=dtrain)
    booster = xgb.train(
        params,
        dtrain,
        num_boost_round=config.train.num_boost_round,
        evals=[(dvalid, "valid")],
        early_stopping_rounds=config.train.early_stopping_rounds,
        verbose_eval=False,
    )
    booster.save_model(str(Path(run_uri) / "plain-model.ubj"))
    return {
        "seconds": time.perf_counter() - started,
        "rounds": booster.num_boosted_rounds(),
        "valid_aucpr": float(booster.best_score),
    }


def rayline_train(config, run_uri: str) -> dict:
    shutil.rmtree(Path(run_uri) / "train", ignore_errors=True)  # no resuming a previous run
    started = time.perf_counter()
    result = train_model(config, run_uri)
    return {
        "seconds": time.perf_counter() - started,
        "rounds": result.rounds,
        "valid_aucpr": result.valid_aucpr,
        "plan": result.plan,
        "reason": result.plan_reason,
    }


def median_run(runs: list[dict]) -> dict:
    """The run with the median time (an odd count gives a real run, so its metrics match)."""
    middle = statistics.median_low(run["seconds"] for run in runs)
    return {
        **next(run for run in runs if run["seconds"] == middle),
        "all_seconds": [round(run["seconds"], 3) for run in runs],
    }


def main(
    rows: Annotated[int, typer.Option(help="Large size (transactions)")] = 2_000_000,
    small_rows: Annotated[int, typer.Option(help="Small size (transactions)")] = 20_000,
    plan: Annotated[
        str, typer.Option(help="rayline train.plan: auto, single, distributed")
    ] = "auto",
    rounds: Annotated[
        int, typer.Option(help="Boosting rounds (early stopping may end sooner)")
    ] = 300,
    repeat: Annotated[int, typer.Option(help="Timed runs per size and side (medians)")] = 3,
    tag: Annotated[str, typer.Option(help="Results file suffix (default: the plan)")] = "",
    base: Annotated[str, typer.Option(help="Scratch folder")] = "/tmp/rayline-bench/train",
) -> None:
    """Benchmark rayline train against plain xgboost at two data sizes."""
    from rich.table import Table

    from jobs.summary import console

    overrides = {"train.plan": plan, "train.num_boost_round": rounds}
    results = {
        "command": " ".join(sys.argv),
        "date": date.today().isoformat(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "xgboost": xgb.__version__,
        "sizes": {},
    }
    results["ray_start_seconds"] = round(init_ray(None), 2)
    table = Table(
        title=f"train: rayline vs plain xgboost, medians of {repeat} (Ray start excluded)"
    )
    for column in (
        "rows",
        "train rows",
        "plain s",
        "rayline s",
        "ratio",
        "extra s",
        "plan",
        "valid PR-AUC plain / rayline",
        "load (1 min)",
    ):
        table.add_column(column)
    for size in (small_rows, rows):
        config, run_uri = prepared_run(size, Path(base), overrides)
        plain_xgboost(config, run_uri)  # warm the page cache and xgboost's lazy init
        runs: dict[str, list] = {"plain": [], "rayline": [], "load": []}
        for _ in range(repeat):
            runs["load"].append(round(os.getloadavg()[0], 2))
            runs["plain"].append(plain_xgboost(config, run_uri))
            runs["rayline"].append(rayline_train(config, run_uri))
        plain, ours = (median_run(runs[side]) for side in ("plain", "rayline"))
        train_rows = Storage().read_json(join(run_uri, "features", "_report.json"))["rows"]["train"]
        ratio, extra = ours["seconds"] / plain["seconds"], ours["seconds"] - plain["seconds"]
        results["sizes"][size] = {
            "train_rows": train_rows,
            "plain": plain,
            "rayline": ours,
            "ratio": round(ratio, 3),
            "extra_seconds": round(extra, 3),
            "runs": runs,
        }
        table.add_row(
            f"{size:,}",
            f"{train_rows:,}",
            f"{plain['seconds']:.2f}",
            f"{ours['seconds']:.2f}",
            f"{ratio:.2f}x",
            f"{extra:+.2f}",
            ours["plan"],
            f"{plain['valid_aucpr']:.4f} / {ours['valid_aucpr']:.4f}",
            " ".join(f"{load:g}" for load in runs["load"]),
        )
    console.print(table)
    console.print(f"Ray start (excluded above): {results['ray_start_seconds']} s")
    suffix = tag or ("" if plan == "auto" else plan)
    name = f"train-{suffix + '-' if suffix else ''}{date.today():%Y%m%d}.json"
    out = ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    console.print(f"results: {out}")


if __name__ == "__main__":
    typer.run(main)
