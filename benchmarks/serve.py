"""rayline's Ray Serve endpoint vs a bare FastAPI + uvicorn app doing the same work, over HTTP.

    python -m benchmarks.serve [--levers none,ha] [--bare-scorers auto] [--repeat 1]
                               [--duration 10 | --quick] [--out FILE]

Each server runs as its own subprocess tree (benchmarks/http_load.py): rayline is
`python -m serving.app` on a copy of the config with a free port, once per env lever set
(`--levers`, see LEVERS); bare is benchmarks/bare_serve.py under `uvicorn --workers 2`, once per
scorer. wrk, in another process on the same cores, POSTs a 1-record and a 64-record body
(clean records from the demo's sample data) with a bearer token at each concurrency, after a
warm-up; every server's scores are first checked against `jobs.predict.score_records`. Also
measured in-process on one thread: `booster.inplace_predict` (the raw model ceiling) and the
bare app's scorers. Other work on a shared machine is waited out before each server (up to
--quiet-wait) and measured during each cell ("other cpu%"); `--repeat N` keeps the best of N.
Needs the registry `make demo` leaves (the config's storage) and `wrk` on PATH.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Annotated

import psutil
import typer
import yaml

from benchmarks.http_load import ROOT, background, cpu_seconds, free_port, post, start, stop, wrk

TOKEN = "bench-token"
LEVERS = {  # names checked against ray/serve/_private/constants.py (Ray 2.60)
    "none": {},
    # HAProxy in front; replicas run their own uvicorn (direct ingress: no Serve proxy actor)
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"},
    # user code on the replica's loop, gRPC handles, direct ingress, buffered logs, frozen GC
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}
LEVERS["ha"] = LEVERS["haproxy"] | LEVERS["throughput"]


def measure(label: str, argv: list[str], env: dict, url: str, bodies: dict[int, Path], opts: dict):
    """Waits for a quiet machine, starts one server, checks its answers, warms it up, runs
    every cell and stops it. Other work on the machine is measured before and after."""
    entry = {"argv": argv[1:], "background_cpu_pct": background(opts, label), "cells": []}
    log = opts["work"] / f"{label}.log"
    proc, entry["startup_s"] = start(label, argv, env, url, opts["startup_timeout"], log)
    try:
        entry["max_score_diff"] = 0.0  # against jobs.predict.score_records in this process
        for n, path in bodies.items():
            status, answer = post(url, path.read_bytes(), TOKEN)
            if status != 200 or len(answer.get("predictions", [])) != n:
                sys.exit(f"{label}: POST /predict with {n} records answered {status} {answer}")
            got = [p["score"] for p in answer["predictions"]]
            diff = max(abs(a - b) for a, b in zip(got, opts["expected"], strict=False))
            entry["max_score_diff"] = diff = max(entry["max_score_diff"], diff)
            entry[f"answer_{n}"] = {**answer, "predictions": answer["predictions"][:2]}
        if entry["max_score_diff"] > 1e-6:
            print(f"  WARNING {label}: scores differ from score_records by {diff:.3g}")
        entry["status_without_token"] = post(url, bodies[min(bodies)].read_bytes(), None)[0]
        server = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for path in bodies.values():  # warm-up
            wrk(url, path, TOKEN, 8, opts["warmup"], opts["threads"], server)
        time.sleep(1)
        before = cpu_seconds(server)
        time.sleep(3)  # what the server burns with no requests (Ray's own processes included)
        entry["idle_cpu_pct"] = round(100 * (cpu_seconds(server) - before) / 3, 1)
        for n, path in bodies.items():
            for conns in opts["concurrency"]:
                # best of `repeat` runs: other work on a shared machine only ever slows a run
                runs = [
                    wrk(url, path, TOKEN, conns, opts["duration"], opts["threads"], server)
                    for _ in range(opts["repeat"])
                ]
                cell = max(runs, key=lambda run: run["req_s"])
                ok = 1 - cell["non2xx"] / max(cell["requests"], 1)
                cell = {"records": n, "concurrency": conns, **cell}
                cell["runs_req_s"] = [run["req_s"] for run in runs]
                cell["records_s"] = round(cell["req_s"] * ok * n)
                entry["cells"].append(cell)
                print(row(label, cell), flush=True)
    finally:
        stop(proc)
    entry["background_after_cpu_pct"] = background({**opts, "quiet_wait": 0}, label)
    return entry


def plan(config: str, levers: list[str], scorers: list[str], work: Path):
    """(label, argv, env, port) per server: rayline per lever set, then bare per scorer."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    base["RAYLINE_SERVE_TOKENS"] = f"predict:{TOKEN}"
    raw = yaml.safe_load(Path(config).read_text())
    for lever in levers:
        raw.setdefault("serve", {})["port"] = port = free_port()  # the rest of the config as is
        path = work / f"config-{lever}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        argv = [sys.executable, "-m", "serving.app", "--config", str(path)]
        label = "rayline" if lever == "none" else f"rayline+{lever}"
        yield label, argv, base | LEVERS[lever], port
    for number, wanted in enumerate(scorers):
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "benchmarks.bare_serve:create_app", "--factory"]
        argv += ["--workers", "2", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--log-level", "warning", "--no-access-log"]
        # One OpenMP thread per worker process, as Ray gives a 1-CPU (or less) replica: with
        # xgboost's default (all cores) the two workers' spinning threads fight over 2 cores.
        env = {"OMP_NUM_THREADS": "1"} | base
        env |= {"RAYLINE_BENCH_CONFIG": str(Path(config).resolve()), "RAYLINE_BENCH_SCORER": wanted}
        yield ("bare" if number == 0 else f"bare+{wanted}"), argv, env, port


def csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


HEADER = ("rec", "conc", "req/s", "records/s", "p50 ms", "p99 ms", "non-2xx", "wrk cpu%")
HEADER += ("srv ms/req", "other cpu%", "vs bare")


def row(label: str, c: dict) -> str:
    """One line of the table: srv ms/req is the server's CPU per request (all its processes),
    other cpu% what the rest of the machine used meanwhile (percent of one core)."""
    values = (c["records"], c["concurrency"], f"{c['req_s']:,.0f}", f"{c['records_s']:,}")
    values += (c["p50_ms"], c["p99_ms"], c["non2xx"], c["wrk_cpu_pct"])
    values += (c["server_cpu_ms_per_req"], c["other_cpu_pct"])
    values += (f"{c['vs_bare']:.2f}x" if c.get("vs_bare") else "",)
    return f"{label:<18}" + "".join(f"{v!s:>11}" for v in values)


def report(results: dict) -> None:
    """Prints the table (rayline/bare req/s per cell) and whether the issue's targets are met."""
    cells = results["servers"].get("bare", {}).get("cells", [])
    bare = {(c["records"], c["concurrency"]): c["req_s"] for c in cells}
    print(f"\n{'server':<18}" + "".join(f"{h:>11}" for h in HEADER))
    for label, entry in results["servers"].items():
        for c in entry["cells"]:
            other = bare.get((c["records"], c["concurrency"])) if label != "bare" else None
            c["vs_bare"] = round(c["req_s"] / other, 2) if other else None
            print(row(label, c))
    for label, entry in results["servers"].items():
        if not label.startswith("rayline") or not entry["cells"]:
            continue
        top = max(c["concurrency"] for c in entry["cells"])
        at_top = [c["vs_bare"] or 0 for c in entry["cells"] if c["concurrency"] == top]
        single = [c["req_s"] for c in entry["cells"] if c["records"] == 1]
        entry["targets"] = {
            f"c={top} req/s >= bare": min(at_top) >= 1,
            "p99 < 100 ms": all((c["p99_ms"] or 1e9) < 100 for c in entry["cells"]),
            ">= 1,500 single-record req/s": max(single, default=0) >= 1500,
        }
        print(f"{label} targets met: {entry['targets']}")


def main(
    config: Annotated[str, typer.Option(help="Pipeline config YAML")] = "configs/fraud.yaml",
    levers: Annotated[str, typer.Option(help=f"rayline env sets, of {list(LEVERS)}")] = "none,ha",
    bare_scorers: Annotated[
        str, typer.Option(help="bare app runs, one per scorer: auto, records, online ('': none)")
    ] = "auto",
    bodies: Annotated[str, typer.Option(help="Records per request body")] = "1,64",
    concurrency: Annotated[str, typer.Option(help="wrk connections")] = "1,8,64",
    duration: Annotated[float, typer.Option(help="Seconds per cell")] = 10.0,
    warmup: Annotated[float, typer.Option(help="Warm-up seconds per body")] = 5.0,
    quick: Annotated[bool, typer.Option(help="3 s cells, 2 s warm-up")] = False,
    repeat: Annotated[int, typer.Option(help="Runs per cell; the best is kept")] = 1,
    threads: Annotated[int, typer.Option(help="wrk threads")] = 1,
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for a server")] = 300,
    max_background: Annotated[
        float, typer.Option(help="Wait for other work below this CPU% before each server")
    ] = 30,
    quiet_wait: Annotated[float, typer.Option(help="...for at most this many seconds")] = 300,
    out: Annotated[str, typer.Option(help="JSON results (default benchmarks/results/)")] = "",
) -> None:
    """Benchmark rayline's Serve app against a bare FastAPI + uvicorn app over HTTP."""
    import ray
    import xgboost

    from benchmarks import bare_serve
    from jobs.config import load_config
    from jobs.registry import load_bundle
    from jobs.storage import Storage, join

    if shutil.which("wrk") is None:
        typer.echo("wrk is not installed: apt-get install -y wrk", err=True)
        raise typer.Exit(2)
    if unknown := [lever for lever in csv(levers) if lever not in LEVERS]:
        raise typer.BadParameter(f"unknown levers {unknown}; known: {list(LEVERS)}")
    duration, warmup = (3.0, min(warmup, 2.0)) if quick else (duration, warmup)
    loaded = load_config(config)
    name, alias = bare_serve.served_model(loaded)
    registry = join(loaded.storage, "registry")
    try:
        bundle = load_bundle(Storage(loaded.s3), registry, name, alias)
    except Exception as error:  # noqa: BLE001 - whatever the cause, there is no usable bundle
        message = f"no {alias!r} bundle of {name!r} in {registry} ({error})"
        typer.echo(f"{message}: run `make demo` first", err=True)
        raise typer.Exit(2) from None
    sizes = sorted({int(b) for b in csv(bodies)})
    records, expected = bare_serve.clean_records(loaded, bundle, max(sizes))
    work = Path(tempfile.mkdtemp(prefix="rayline-bench-serve-"))
    files = {n: work / f"body-{n}.json" for n in sizes}
    for n, path in files.items():
        path.write_text(json.dumps({"records": records[:n]}))
    results = {
        "command": " ".join(["python -m benchmarks.serve", *sys.argv[1:]]),
        "date": date.today().isoformat(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "xgboost": xgboost.__version__,
        "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0],
        "model": {"name": bundle.name, "version": bundle.version, "alias": alias},
        "duration_s": duration,
        "warmup_s": warmup,
        "wrk_threads": threads,
        "repeat": repeat,
        "levers": {lever: LEVERS[lever] for lever in csv(levers)},
    }
    opts = {"work": work, "startup_timeout": startup_timeout, "warmup": warmup}
    opts |= {"max_background": max_background, "quiet_wait": quiet_wait}
    print("in-process ceilings, one thread (calls/s and rows/s) ...")
    results["ceiling_background_cpu_pct"] = background(opts, "ceilings")
    seconds = 1.0 if quick else 3.0
    scorers = csv(bare_scorers)
    results["ceiling"] = bare_serve.ceilings(bundle, records, scorers, seconds, repeat)
    print(results["ceiling"])
    opts |= {"duration": duration, "threads": threads, "expected": expected, "repeat": repeat}
    opts["concurrency"] = [int(c) for c in csv(concurrency)]
    results["servers"] = {}
    for label, argv, env, port in plan(config, csv(levers), csv(bare_scorers), work):
        print(f"{label}: {' '.join(argv[1:5])} ...")
        entry = measure(label, argv, env, f"http://127.0.0.1:{port}", files, opts)
        results["servers"][label] = {"env": LEVERS.get(label.partition("+")[2], {}), **entry}
    report(results)
    target = Path(out) if out else ROOT / "benchmarks/results" / f"serve-{date.today():%Y%m%d}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {target} (server logs in {work})")


if __name__ == "__main__":
    typer.run(main)
