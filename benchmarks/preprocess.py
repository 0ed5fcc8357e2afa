"""Preprocess benchmark: rayline's ingest + features against the same work in polars and pandas.

    .venv/bin/python -m benchmarks.preprocess [--rows 2000000] [--data /tmp/rayline-bench/data]
        [--out /tmp/rayline-bench/out] [--only rayline,polars,pandas]

Sample data comes from jobs.data.generate and is cached per row count under --data. rayline runs
configs/fraud.yaml on a local Ray started with every core (the start is timed on its own), twice:
cold (first run after start) and warm (workers up). The polars and pandas versions
(benchmarks/baselines_{polars,pandas}.py; shared parts and the known differences from rayline in
baselines_preprocess.py) write the same outputs under --out/<implementation>.
Row counts, quarantine counts and reasons must agree; the split sizes within a few rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import ray
from rich.console import Console
from rich.table import Table

from benchmarks import baselines_preprocess as baselines
from jobs.config import Config, load_config
from jobs.data import generate
from jobs.features import build_features
from jobs.ingest import ingest
from jobs.pii import pii_key
from jobs.ray_runtime import init_ray

IMPLEMENTATIONS = ("rayline", "polars", "pandas")
SOURCES = ("transactions", "customers", "merchants")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = ["python", "-m", "benchmarks.preprocess"]
SPLIT_TOLERANCE = 5  # rows; polars hashes the transaction id its own way


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--data", type=Path, default=Path("/tmp/rayline-bench/data"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/rayline-bench/out"))
    parser.add_argument("--only", default=",".join(IMPLEMENTATIONS))
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(IMPLEMENTATIONS))
    if unknown or not args.only:
        parser.error(f"--only takes a subset of {','.join(IMPLEMENTATIONS)} (got {unknown})")
    return args


def ensure_data(root: Path, rows: int) -> Path:
    """The sample data for `rows`, generated once per row count (a marker file when complete)."""
    folder = root / str(rows)
    marker = folder / "_generated.json"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        generated = generate(str(folder), rows=rows)
        marker.write_text(json.dumps(asdict(generated), indent=2))
        print(f"generated {rows:,} rows in {time.perf_counter() - started:.1f} s -> {folder}")
    return folder


def make_config(data: Path, out: Path) -> Config:
    overrides = {f"sources.{name}.uri": str(data / name) for name in SOURCES}
    # The pandas/polars baselines implement the seeded, stratified random split; the fraud
    # config's time split is compared in its own right, not against them.
    overrides["split.by"] = "random"
    return load_config(ROOT / "configs" / "fraud.yaml", {"storage": str(out), **overrides})


def run_rayline(config: Config, out: Path) -> tuple[dict[str, float], dict]:
    started = time.perf_counter()
    init_ray(num_cpus=os.cpu_count())
    seconds = {"ray_start": time.perf_counter() - started}
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    for label in ("cold", "warm"):
        started = time.perf_counter()
        ingested = ingest(config, str(out / label))
        # As jobs.pipeline does: the clean blocks pass to features in Ray's object store.
        built = build_features(config, str(out / label), blocks=ingested.fact_blocks)
        seconds[f"rayline_{label}"] = time.perf_counter() - started
    ray.shutdown()
    fields = ("rows_in", "rows_out", "rows_quarantined", "reasons")
    reports = {name: {f: getattr(r, f) for f in fields} for name, r in ingested.sources.items()}
    return seconds, baselines.summary(reports, built.rows, built.positives)


def compare(counts: dict[str, dict]) -> list[str]:
    """Disagreements between implementations (the first one is the reference)."""
    reference, *others = list(counts)
    problems = []
    for name in others:
        ours, theirs = counts[reference], counts[name]
        for field in ("rows_in", "clean", "quarantined", "reasons"):
            if ours[field] != theirs[field]:
                problems.append(f"{name} {field} {theirs[field]} != {reference} {ours[field]}")
        for field in ("splits", "positives"):
            for split, value in ours[field].items():
                if abs(value - theirs[field].get(split, -(10**9))) > SPLIT_TOLERANCE:
                    problems.append(
                        f"{name} {field}.{split} {theirs[field].get(split)} != {reference} {value}"
                    )
    return problems


def machine() -> dict:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {"cpu_count": os.cpu_count(), "memory_gib": round(memory, 1)}
    info["load_average_at_start"] = [round(load, 2) for load in os.getloadavg()]
    info |= {"platform": platform.platform(), "python": platform.python_version()}
    return info | {module.__name__: module.__version__ for module in (ray, pl, pd, pa, np)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    host = machine()  # before the runs, so the load average says how busy the machine was
    warnings.filterwarnings("ignore", message=".*is not set: hashing PII.*")
    data = ensure_data(args.data, args.rows)
    config = make_config(data, args.out / "rayline")
    key = pii_key(config)
    seconds: dict[str, float] = {}
    counts: dict[str, dict] = {}
    for name in args.only:
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        if name == "rayline":
            timings, counts[name] = run_rayline(config, out)
            seconds |= timings
        else:
            started = time.perf_counter()
            counts[name] = baselines.run(name, config, key, out)
            seconds[name] = time.perf_counter() - started
        print(f"{name}: done ({', '.join(f'{k} {v:.2f} s' for k, v in seconds.items())})")

    fact_rows = next(iter(counts.values()))["rows_in"][config.fact]
    throughput = {k: fact_rows / v for k, v in seconds.items() if k != "ray_start"}
    ratios = {
        f"{ray_run}_vs_{base}": throughput[ray_run] / throughput[base]
        for ray_run in ("rayline_cold", "rayline_warm")
        if ray_run in throughput
        for base in ("polars", "pandas")
        if base in throughput
    }
    problems = compare(counts) if len(counts) > 1 else []
    now = datetime.now()
    result = {
        "benchmark": "preprocess",
        "rows": args.rows,
        "fact_rows_in": fact_rows,
        "seconds": seconds,
        "rows_per_second": throughput,
        "rayline_throughput_ratio": ratios,
        "rayline_cold_with_ray_start_s": (
            seconds["ray_start"] + seconds["rayline_cold"] if "ray_start" in seconds else None
        ),
        "counts": counts,
        "counts_agree": not problems,
        "disagreements": problems,
        "notes": baselines.NOTES,
        "machine": host,
        "data": str(data),
        "out": str(args.out),
        "command": shlex.join([*COMMAND, *(sys.argv[1:] if argv is None else argv)]),
        "date": now.isoformat(timespec="seconds"),
    }
    report(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"preprocess-{args.rows}-{now:%Y%m%d}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return result


def report(result: dict) -> None:
    console = Console()
    table = Table(
        title=f"ingest + features, {result['fact_rows_in']:,} transactions "
        f"({result['machine']['cpu_count']} CPUs)"
    )
    for column in ("implementation", "seconds", "rows/s", "rayline warm ÷ this"):
        table.add_column(column, justify="left" if column == "implementation" else "right")
    seconds, throughput = result["seconds"], result["rows_per_second"]
    for name, value in seconds.items():
        rate = throughput.get(name)
        versus = (
            f"{throughput['rayline_warm'] / rate:.2f}x"
            if rate and "rayline_warm" in throughput and name in ("polars", "pandas")
            else ""
        )
        table.add_row(
            name.replace("_", " "), f"{value:.2f}", f"{rate:,.0f}" if rate else "", versus
        )
    console.print(table)
    for name, ratio in result["rayline_throughput_ratio"].items():
        label = name.replace("_vs_", " vs ").replace("_", " ")
        console.print(f"throughput ratio {label}: {ratio:.3f}")
    if result["disagreements"]:
        console.print("[bold red]WARNING: the implementations disagree on row counts:[/]")
        for problem in result["disagreements"]:
            console.print(f"  [red]{problem}[/]")
    elif len(result["counts"]) > 1:
        console.print(f"row counts agree across {', '.join(result['counts'])}")


if __name__ == "__main__":
    main()
