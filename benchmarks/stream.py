"""Streaming: rayline's stream workers (Ray actors) against a plain single-process consumer.

    python -m benchmarks.stream [--config configs/fraud.yaml] [--events 100000] [--rate 5000]
        [--seconds 20] [--high 0.8] [--out FILE]

Needs `make demo`'s registry (copied to a temp storage). Both consumers: one redis-server of our
own (no persistence), the same generated events and bundle; each phase under its own key prefix
from an empty online state, FLUSHDB after it.

Throughput: `--events` pre-loaded (`jobs.replay`, unpaced), then drained; events/s from the
first to the last `scored_at`. Rate: a producer process replays at `--rate` events/s for
`--seconds` while the consumer runs; latency = `scored_at - enqueued_at` of every scores entry,
and the lag the moment the producer finished; then again at `--high` × measured throughput.
rayline: `run_stream`, min=max=2 workers × 1 CPU, 4 partitions, local Ray with num_cpus=2 (the
driver, redis-server and the producer share the same 2 cores). plain: `PlainConsumer` below, one
process: XREADGROUP micro-batches, the same validation, `FeatureState.step`, `OnlineScorer` and
one MULTI/EXEC per batch with the same writes. Plain runs first, before Ray starts.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Annotated

import numpy as np
import redis
import typer
from pydantic import ValidationError

from jobs.config import load_config
from jobs.feature_state import FeatureState
from jobs.online import OnlineScorer
from jobs.records import record_model
from jobs.registry import load_bundle
from jobs.storage import Storage, join
from jobs.stream_events import decision, ensure_groups, parse_event
from jobs.stream_keys import StreamKeys

ROOT = Path(__file__).resolve().parents[1]
STREAM = {"min_workers": 2, "max_workers": 2, "worker_cpus": 1, "partitions": 4}


def loadavg() -> list[float]:  # noted with every measurement: the 2 cores are shared
    return [round(x, 2) for x in os.getloadavg()]


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        shutil.which("redis-server") or "redis-server", "--port", str(port),
        "--bind", "127.0.0.1", "--dir", str(folder), "--save", "", "--appendonly", "no",
        "--protected-mode", "no", "--logfile", str(folder / "redis.log"),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"redis://127.0.0.1:{port}/0", time.monotonic() + 20
    client = redis.Redis.from_url(url)
    while True:
        try:
            client.ping()
            return process, url
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)


class PlainConsumer:
    """What one would write by hand with redis-py: read a micro-batch from every partition,
    validate, features + model, one MULTI/EXEC with everything the batch changes."""

    def __init__(self, config, client: redis.Redis):
        self.config, self.stream, self.client = config, config.stream, client
        self.keys = StreamKeys.of(config)
        ensure_groups(client, self.keys, self.stream.group)
        storage = Storage(config.s3)
        bundle = load_bundle(storage, join(config.storage, "registry"), config.name, "production")
        self.bundle, self.spec = bundle, bundle.spec
        self.scorer = OnlineScorer(bundle)
        self.state = FeatureState(client, self.keys.prefix, bundle.spec.features, self.stream)
        self.model = record_model(bundle.spec)
        self.streams = {s: ">" for s in self.keys.all_events()}
        self.entity = bundle.spec.features.history.entity
        self.key = bundle.spec.source.primary_key
        self.scored = 0

    def poll(self) -> int:
        replies = self.client.xreadgroup(
            self.stream.group, "plain", self.streams,
            count=self.stream.batch_size, block=self.stream.block_ms,
        )  # fmt: skip
        events = [parse_event(s.decode(), i, f) for s, got in replies or [] for i, f in got]
        if not events:
            return 0
        by_partition: dict[int, list] = {}
        for event in events:
            by_partition.setdefault(int(event.stream.rsplit(":", 1)[-1]), []).append(event)
        check = self.client.pipeline(transaction=False)
        for partition, items in by_partition.items():
            check.zmscore(self.keys.done(partition), [e.message_id for e in items])
        seen = {
            e.message_id
            for items, found in zip(by_partition.values(), check.execute(), strict=True)
            for e, when in zip(items, found, strict=True)
            if when is not None
        }
        events = [e for e in events if e.message_id not in seen]
        good, records, dead = [], [], []
        for event in events:
            if event.reason is None:
                try:
                    records.append(self.model.model_validate(event.record).model_dump())
                    good.append(event)
                    continue
                except ValidationError as error:
                    event.reason = str(error.errors()[0].get("msg"))
            dead.append(event)
        steps = []

        def prior(entities, amounts, seconds, null_time, reasons):
            usable = [r is None and not t for r, t in zip(reasons, null_time, strict=True)]
            seconds = [None if t else int(s) for s, t in zip(seconds, null_time, strict=True)]
            ids = [f"{e.stream}/{e.message_id}" for e in good]
            step = self.state.step(
                self.state.read(entities), entities, amounts, seconds, ids, usable, advance=True
            )
            steps.append(step)
            return {"count": step.count, "total": step.total, "last": step.last,
                    "windows": step.windows}  # fmt: skip

        matrix, reasons = self.scorer.features(records, state=prior) if good else (None, [])
        scores = self.scorer.scores_for(matrix, reasons) if good else []
        late = set(steps[0].late) if steps else set()
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        if steps:
            self.state.write(pipe, steps[0].updated)
        scored = 0
        for row, event in enumerate(good):
            record = event.record
            if reasons[row] is not None or row in late:
                dead.append(event)
                continue
            entry = {
                "id": event.message_id, "stream": event.stream,
                "key": str(record.get(self.key, "")), "entity": str(record.get(self.entity)),
                "model": self.bundle.name, "version": self.bundle.version,
                "event_time": str(record.get(self.spec.features.timestamp, "")),
                "scored_at": now, "enqueued_at": event.enqueued_at or "",
            } | decision(scores[row], self.spec, self.bundle.threshold)  # fmt: skip
            pipe.xadd(self.keys.scores, entry, maxlen=self.stream.output_stream_maxlen,
                      approximate=True)  # fmt: skip
            kept = {k: entry[k] for k in ("score", "label", "model", "version")} | {"at": now}
            pipe.set(self.keys.prediction(entry["key"]), json.dumps(kept),
                     ex=self.stream.prediction_ttl_s)  # fmt: skip
            scored += 1
        for event in dead:
            pipe.xadd(self.keys.dead, {"stream": event.stream, "id": event.message_id,
                                       "reason": event.reason or "unscored"})  # fmt: skip
        for partition, items in by_partition.items():
            pipe.zadd(self.keys.done(partition), {e.message_id: now for e in items})
        pipe.hincrby(self.keys.stats, "scored", scored)
        by_stream: dict[str, list[str]] = {}
        for event in events:
            by_stream.setdefault(event.stream, []).append(event.message_id)
        for stream, ids in by_stream.items():
            pipe.xack(stream, self.stream.group, *ids)
        pipe.execute()
        self.scored += scored
        return len(events)


def _produce(config_path: str, overrides: dict, source: str, rate, limit, queue) -> None:
    from jobs.replay import replay

    config = load_config(config_path, overrides)
    result = replay(config, source_uri=source, rate=rate, limit=limit)
    queue.put({"events": result.events, "rate": round(result.rate, 1), "seconds": result.seconds})


class Producer:
    """`jobs.replay` in a process of its own; records the lag the moment it finishes."""

    def __init__(self, setup: dict, prefix: str, rate: float, limit: int):
        context = multiprocessing.get_context("spawn")
        self.queue = context.Queue()
        args = (setup["config_path"], setup["overrides"] | {"stream.prefix": prefix},
                setup["source"], rate, limit, self.queue)  # fmt: skip
        self.process = context.Process(target=_produce, args=args, daemon=True)
        self.setup, self.prefix = setup, prefix
        self.result: dict = {}
        self.done = threading.Event()

    def start(self) -> Producer:
        self.process.start()
        threading.Thread(target=self._wait, daemon=True).start()
        return self

    def _wait(self) -> None:
        from jobs.stream import consumer_lag

        self.result = self.queue.get()
        config = self.setup["config_for"](self.prefix)
        client = redis.Redis.from_url(config.stream.redis_url)
        self.result["lag_at_end"] = consumer_lag(client, StreamKeys.of(config), "rayline")
        self.result["loadavg"] = loadavg()
        self.process.join()
        self.done.set()


def collect(config, sent: int) -> dict:
    """Latencies and throughput from the scores stream of one phase, then FLUSHDB."""
    client, keys = redis.Redis.from_url(config.stream.redis_url), StreamKeys.of(config)
    scored, enqueued, start = [], [], "-"
    while True:
        entries = client.xrange(keys.scores, min=start, count=20000)
        for _, fields in entries:
            scored.append(float(fields[b"scored_at"]))
            enqueued.append(float(fields[b"enqueued_at"] or "nan"))
        if len(entries) < 20000:
            break
        start = f"({entries[-1][0].decode()}"
    dead = client.xlen(keys.dead)
    client.flushdb()
    scored_at, lat = np.array(scored), (np.array(scored) - np.array(enqueued)) * 1e3
    span = float(scored_at.max() - scored_at.min()) if len(scored) > 1 else float("nan")
    out = {"sent": sent, "scored": len(scored), "dead": dead, "span_s": round(span, 3),
           "events_per_s": round(len(scored) / span, 1) if span > 0 else None}  # fmt: skip
    if len(lat):
        out |= {f"{n}_ms": round(float(np.percentile(lat, q)), 2)
                for n, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}  # fmt: skip
    return out


def plain_phase(setup: dict, prefix: str, rate=None, limit=None) -> dict:
    config = setup["config_for"](prefix)
    client = redis.Redis.from_url(config.stream.redis_url)
    consumer = PlainConsumer(config, client)
    producer = None
    if rate is None:
        sent = preload(setup, config)
    else:
        producer = Producer(setup, prefix, rate, limit).start()
    idle, before = 0, loadavg()
    while idle < 20:  # 20 empty reads of block_ms (50 ms) after the producer is done
        handled = consumer.poll()
        busy = handled or (producer is not None and not producer.done.is_set())
        idle = 0 if busy else idle + 1
    if producer is not None:
        sent = producer.result["events"]
    return collect(config, sent) | {"loadavg_before": before, "loadavg_after": loadavg(),
                                    "producer": producer.result if producer else None}  # fmt: skip


class _Stop(KeyboardInterrupt):
    """run_stream stops its workers cleanly on KeyboardInterrupt (raised from a hook)."""


def rayline_phase(setup: dict, prefix: str, rate=None, limit=None) -> dict:
    from jobs.stream import consumer_lag, run_stream

    config = setup["config_for"](prefix)
    sent = preload(setup, config) if rate is None else 0
    producer = Producer(setup, prefix, rate, limit) if rate is not None else None
    state = {"idle": 0, "loadavg": loadavg()}
    client, keys = redis.Redis.from_url(config.stream.redis_url), StreamKeys.of(config)

    def hook(coordinator) -> None:  # once a second on the driver; workers are up by now
        if producer is not None:
            if producer.process.pid is None:
                producer.start()
                return
            if not producer.done.is_set():
                return
        lag = consumer_lag(client, keys, config.stream.group)
        state["idle"] = state["idle"] + 1 if lag == 0 else 0
        if state["idle"] >= 2:
            raise _Stop

    result = run_stream(config, quiet=True, hooks=(hook,))
    if producer is not None:
        sent = producer.result["events"]
    return collect(config, sent) | {
        "loadavg_before": state["loadavg"], "loadavg_after": loadavg(),
        "producer": producer.result if producer else None,
        "worker_start_s": result.worker_start_s, "workers_peak": result.workers_peak,
    }  # fmt: skip


def preload(setup: dict, config) -> int:
    from jobs.replay import replay

    return replay(config, source_uri=setup["source"], limit=setup["events"]).events


def run_all(setup: dict, kind: str, rate: float, seconds: float, high: float) -> dict:
    phase = plain_phase if kind == "plain" else rayline_phase
    tag = uuid.uuid4().hex[:6]
    out = {"throughput": phase(setup, f"bench:{kind}:tp:{tag}")}
    print(f"{kind} throughput: {out['throughput']}")
    out["rate"] = {}
    best = out["throughput"]["events_per_s"] or rate
    high_rate = max(500, round(best * high / 500) * 500)
    for r in dict.fromkeys([rate, high_rate]):
        limit = min(int(r * seconds), setup["available"])
        out["rate"][str(int(r))] = phase(setup, f"bench:{kind}:r{int(r)}:{tag}", r, limit)
        print(f"{kind} at {r:,.0f}/s: {out['rate'][str(int(r))]}")
    return out


def main(
    config: Annotated[str, typer.Option(help="Pipeline config YAML")] = "configs/fraud.yaml",
    storage_uri: Annotated[str, typer.Option("--storage", help="where the registry is")] = "",
    events: Annotated[int, typer.Option(help="pre-loaded events for throughput")] = 100_000,
    rate: Annotated[float, typer.Option(help="fixed producer rate, events/s")] = 5000.0,
    seconds: Annotated[float, typer.Option(help="length of each rate phase")] = 20.0,
    high: Annotated[float, typer.Option(help="2nd rate: this × measured throughput")] = 0.8,
    only: Annotated[str, typer.Option(help="plain, rayline or both")] = "both",
    out: Annotated[str, typer.Option(help="results JSON (default benchmarks/results/)")] = "",
) -> None:
    """Throughput and event-to-score latency: rayline's stream workers vs a plain consumer."""
    from jobs.data import generate

    base = load_config(config, {"storage": storage_uri} if storage_uri else {})
    work = Path(tempfile.mkdtemp(prefix="rayline-bench-stream-"))
    shutil.copytree(Path(base.storage).resolve() / "registry", work / "storage" / "registry")
    server, url = start_redis(work / "redis")
    try:
        rows = max(events, int(rate * seconds) * 3)
        generate(str(work / "data"), rows=rows, days=max(1, min(30, rows // 2000)), seed=base.seed)
        overrides = {"storage": str(work / "storage"), "stream.redis_url": url}
        overrides |= {f"stream.{k}": v for k, v in STREAM.items()}
        setup = {
            "config_path": config, "overrides": overrides, "events": events,
            "source": str(work / "data" / "transactions"), "available": rows,
            "config_for": lambda p: load_config(config, overrides | {"stream.prefix": p}),
        }  # fmt: skip
        results = {
            "command": " ".join(["python -m benchmarks.stream", *sys.argv[1:]]),
            "date": date.today().isoformat(), "cpus": os.cpu_count(),
            "machine": f"{platform.machine()}, Python {platform.python_version()}",
            "loadavg_start": loadavg(), "events": events, "rate": rate, "seconds": seconds,
            "layout": "rayline: local Ray num_cpus=2, 2 StreamWorker actors x 1 CPU; driver, "
            "redis-server, producer on the same 2 cores. plain: 1 process, Ray not running.",
            "stream": STREAM | {"batch_size": base.stream.batch_size},
        }  # fmt: skip
        if only in ("both", "plain"):
            results["plain"] = run_all(setup, "plain", rate, seconds, high)
        if only in ("both", "rayline"):
            from jobs.ray_runtime import init_ray

            results["ray_start_s"] = round(init_ray(num_cpus=2), 2)
            try:
                results["rayline"] = run_all(setup, "rayline", rate, seconds, high)
            finally:
                import ray

                ray.shutdown()
        if "plain" in results and "rayline" in results:
            tp = [results[k]["throughput"]["events_per_s"] for k in ("rayline", "plain")]
            results["throughput_ratio"] = round(tp[0] / tp[1], 3)
        results["loadavg_end"] = loadavg()
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    report(results)
    name = f"stream-{date.today():%Y%m%d}-{time.strftime('%H%M%S')}.json"
    target = Path(out) if out else ROOT / "benchmarks" / "results" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2))
    print(f"results: {target}")


def report(results: dict) -> None:
    print("consumer phase     sent   scored  events/s   p50 ms   p99 ms   max ms  lag@end  load")
    for kind in ("plain", "rayline"):
        phases = results.get(kind) or {}
        rows = [("drain", phases["throughput"])] if phases else []
        for name, v in rows + [(f"{r}/s", v) for r, v in phases.get("rate", {}).items()]:
            lag = (v.get("producer") or {}).get("lag_at_end", "")
            rate = v["events_per_s"] or 0
            print(f"{kind:8} {name:7} {v['sent']:8,} {v['scored']:8,} {rate:9,.0f}"
                  f" {v.get('p50_ms', 0):8.1f} {v.get('p99_ms', 0):8.1f} {v.get('max_ms', 0):8.1f}"
                  f" {lag!s:>8} {v['loadavg_after'][0]:5.2f}")  # fmt: skip
    if "throughput_ratio" in results:
        print(f"throughput rayline/plain: {results['throughput_ratio']:.2f}x")


if __name__ == "__main__":
    typer.run(main)
