"""The compiled online path vs the batch path vs the bare model, in-process, one thread.

    python -m benchmarks.online --config configs/fraud.yaml [--storage URI] [--seconds 2]
        [--sizes 1,64,1000] [--out FILE]

Needs the registry `make demo` leaves (the config's storage, or --storage). Records are the
first clean rows of the registered run's ingest output (the fact source's standard columns,
as Python values, like a parsed HTTP request). For each batch size, about --seconds in ~20 ms
bursts taken round-robin (so that load on the machine hits all alike): `OnlineScorer.score`,
its `features` alone, `score_records(bundle, records_table(...))` (what serving did before) and
`booster.inplace_predict` on the ready matrix (the model alone, the floor).
Scores and reasons are checked equal before timing. Medians and p90s in milliseconds.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow.parquet as pq
import typer
import xgboost as xgb

from jobs.config import load_config
from jobs.featurespec import online_source
from jobs.online import OnlineScorer, records_table
from jobs.predict import score_records
from jobs.registry import load_bundle
from jobs.storage import Storage, join

ROOT = Path(__file__).resolve().parents[1]


def sample_records(storage: Storage, bundle, fact: str, count: int) -> list[dict]:
    """Clean fact rows from the bundle's run (ingest output), as HTTP records."""
    spec = bundle.spec
    fs, path = storage.filesystem(join(bundle.lineage["run_uri"], "ingest", fact))
    columns = list(online_source(spec.source, spec.features.label).types)
    table = pq.read_table(path, filesystem=fs, columns=columns)
    if table.num_rows == 0:
        raise SystemExit("the run's ingest output is empty")
    rows = table.slice(0, count).to_pylist()
    return (rows * (count // len(rows) + 1))[:count]


def timed(functions: dict, seconds: float) -> dict[str, dict[str, float]]:
    """Bursts of ~20 ms per function, round-robin until `seconds` have passed: warm caches
    within a burst (as a replica scoring request after request), while load on the machine
    hits every function alike."""
    bursts = {}
    for name, function in functions.items():
        started = time.perf_counter()
        function()  # warm, and a first estimate
        bursts[name] = max(1, int(0.02 / (time.perf_counter() - started)))
    samples: dict[str, list[float]] = {name: [] for name in functions}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(map(len, samples.values())) < 20:
        for name, function in functions.items():
            for _ in range(bursts[name]):
                started = time.perf_counter_ns()
                function()
                samples[name].append((time.perf_counter_ns() - started) / 1e6)
    return {
        name: {
            "median_ms": float(np.median(values)),
            "min_ms": float(np.min(values)),
            "p90_ms": float(np.percentile(values, 90)),
            "repetitions": len(values),
        }
        for name, values in samples.items()
    }


def main(
    config: Annotated[str, typer.Option(help="Pipeline config YAML")] = "configs/fraud.yaml",
    storage_uri: Annotated[str, typer.Option("--storage", help="Override the storage")] = "",
    model: Annotated[str, typer.Option(help="Registered model (default: config name)")] = "",
    ref: Annotated[str, typer.Option(help="alias or version")] = "production",
    sizes: Annotated[str, typer.Option(help="Records per call, comma-separated")] = "1,64,1000",
    seconds: Annotated[float, typer.Option(help="Timing budget per size")] = 2.0,
    threads: Annotated[int, typer.Option(help="XGBoost nthread (0: as loaded)")] = 0,
    out: Annotated[str, typer.Option(help="Results JSON (default benchmarks/results/)")] = "",
) -> None:
    """Time the online scorer against the batch path and the bare model."""
    from rich.table import Table

    from jobs.summary import console

    loaded = load_config(config, {"storage": storage_uri} if storage_uri else {})
    storage = Storage(loaded.s3)
    registry = join(loaded.storage, "registry")
    bundle = load_bundle(storage, registry, model or loaded.name, ref)
    if threads:  # both paths share the booster, so both see the setting
        bundle.booster.set_param({"nthread": threads})
    started = time.perf_counter()
    scorer = OnlineScorer.from_bundle(bundle)
    compile_ms = (time.perf_counter() - started) * 1e3
    counts = [int(size) for size in sizes.split(",")]
    records = sample_records(storage, bundle, loaded.fact, max(counts))
    results = {
        "command": " ".join(["python -m benchmarks.online", *sys.argv[1:]]),
        "date": date.today().isoformat(),
        "model": f"{bundle.name} v{bundle.version} ({bundle.spec.task})",
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "xgboost": xgb.__version__,
        "nthread": threads or "as loaded",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "compiled": scorer.arrow_only is None,
        "compile_ms": round(compile_ms, 1),
        "sizes": {},
    }
    table = Table(title=f"{results['model']}, in-process, ms: median (p90)")
    for column in (
        "records",
        "model",
        "features",
        "online",
        "batch",
        "online÷model",
        "batch÷online",
    ):
        table.add_column(column, justify="right")
    for count in counts:
        batch = records[:count]
        online_scores, online_reasons = scorer.score(batch)
        batch_scores, batch_reasons = score_records(bundle, records_table(batch, bundle.spec))
        assert np.array_equal(online_scores, batch_scores, equal_nan=True), "scores differ"
        assert online_reasons == batch_reasons.to_pylist(), "reasons differ"
        matrix, _ = scorer.features(batch)
        timings = timed(
            {
                "model": lambda m=matrix: bundle.booster.inplace_predict(m),
                "features": lambda b=batch: scorer.features(b),
                "online": lambda b=batch: scorer.score(b),
                "batch": lambda b=batch: score_records(bundle, records_table(b, bundle.spec)),
            },
            seconds,
        )
        model_ms, _, online_ms, batch_ms = (timings[k]["median_ms"] for k in timings)
        results["sizes"][count] = timings
        table.add_row(
            f"{count:,}",
            *(f"{t['median_ms']:.3f} ({t['p90_ms']:.2f})" for t in timings.values()),
            f"{online_ms / model_ms:.2f}x",
            f"{batch_ms / online_ms:.1f}x",
        )
    console.print(table)
    console.print(
        "model: booster.inplace_predict on the ready matrix; features: OnlineScorer.features; "
        "online: OnlineScorer.score; batch: score_records(bundle, records_table(records))"
    )
    console.print(
        f"compiled: {results['compiled']} ({compile_ms:.0f} ms once per bundle); "
        f"{os.cpu_count()} CPUs, load average {results['load_average'][0]:.2f}"
    )
    path = (
        Path(out) if out else ROOT / "benchmarks" / "results" / f"online-{date.today():%Y%m%d}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    console.print(f"results: {path}")


if __name__ == "__main__":
    typer.run(main)
