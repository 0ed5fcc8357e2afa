"""Streaming: Redis Streams -> online features -> scores, with labels fed back.

`python -m jobs.stream run --config configs/fraud.yaml` starts stream workers as Ray actors
(each owns some of the entity-keyed partitions; `jobs.stream_worker`), scales them between
`stream.min_workers` and `max_workers` on the consumer lag, copies scores to storage, joins
labels to predictions, exports metrics and submits retraining when quality drops.
`rayline stream replay` feeds a stream for demos and benchmarks (`jobs.replay`).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated

import pyarrow as pa
import redis
import typer

from jobs.config import load_config
from jobs.entrypoint import run_cli
from jobs.errors import ConfigError, StreamError
from jobs.replay import replay_command
from jobs.storage import Storage, join
from jobs.stream_events import ensure_groups, undelivered
from jobs.stream_keys import StreamKeys
from jobs.stream_worker import StreamWorker
from jobs.summary import console


@dataclass
class StreamResult:
    events: int = 0
    scored: int = 0
    dead: int = 0
    late: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    workers_peak: int = 0
    scale_events: list[str] = field(default_factory=list)
    score_files: int = 0
    worker_start_s: list[float] = field(default_factory=list)  # model + state restore time
    feedback: dict = field(default_factory=dict)


def assignment(partitions: int, workers: int) -> list[list[int]]:
    """Partitions dealt round-robin: every partition has exactly one owner."""
    return [list(range(i, partitions, workers)) for i in range(workers)]


def consumer_lag(client: redis.Redis, keys: StreamKeys, group: str, streams=None) -> int:
    """Events not yet handled: never delivered (lag) plus delivered but unacknowledged."""
    total = 0
    for stream in streams or keys.all_events():
        if not client.exists(stream):
            continue
        for info in client.xinfo_groups(stream):
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            if name != group:
                continue
            total += undelivered(client, stream, info) + int(info.get("pending") or 0)
    return total


def scores_folder(config) -> str:
    """`<storage>/stream/<key prefix>/scores/`: streams with other prefixes do not mix."""
    return join(config.storage, "stream", StreamKeys.of(config).prefix.replace(":", "-"), "scores")


def flush_scores(config, client: redis.Redis, storage: Storage) -> int:
    """Copies new scores to `scores_folder/<first id>.parquet`; returns the files written.

    Idempotent: a chunk is named by its first entry and the cursor moves only after the
    write, so a crash in between rewrites the same file (a superset) instead of a duplicate.
    """
    keys, files = StreamKeys.of(config), 0
    folder = scores_folder(config)
    while True:
        cursor = client.get(keys.sink_cursor)
        start = "-" if cursor is None else f"({cursor.decode()}"
        entries = client.xrange(keys.scores, min=start, count=config.stream.sink_every)
        if not entries:
            return files
        rows = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]
        table = pa.table(
            {
                "message_id": [r["id"] for r in rows],
                "stream": [r["stream"] for r in rows],
                "key": [r["key"] for r in rows],
                "entity": [r["entity"] for r in rows],
                "score": [r["score"] for r in rows],
                "label": [r["label"] for r in rows],
                "model": [r["model"] for r in rows],
                "version": pa.array([int(r["version"]) for r in rows], pa.int32()),
                "event_time": [r["event_time"] for r in rows],
                "scored_at": pa.array([float(r["scored_at"]) for r in rows], pa.float64()),
            }
        )
        first = entries[0][0].decode()
        storage.write_table(join(folder, f"{first.replace('-', '_')}.parquet"), table)
        client.set(keys.sink_cursor, entries[-1][0])
        files += 1


def connect(url: str) -> redis.Redis:
    """A client whose broker answers, or a StreamError naming the URL."""
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise StreamError(f"stream.redis_url: cannot reach {url}: {error}") from None
    return client


def _when_available(method, *args, timeout: float = 120.0):
    """Calls an actor method, waiting out a restart (Ray restarts a worker that died)."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(method.remote(*args))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Coordinator:
    """Starts, scales and stops the worker actors; runs on the driver."""

    def __init__(self, config):
        import ray

        self.config, self.stream = config, config.stream
        self.keys = StreamKeys.of(config)
        self.client = connect(self.stream.redis_url)
        ensure_groups(self.client, self.keys, self.stream.group)
        self.actor_class = ray.remote(StreamWorker).options(
            num_cpus=self.stream.worker_cpus, max_concurrency=4, max_restarts=-1
        )
        self.workers: list = []
        self.runs: list = []
        self.result = StreamResult()
        self.low_since: float | None = None

    def start(self) -> None:
        for _ in range(self.stream.min_workers):
            self._add()
        self._rebalance()

    def _add(self) -> None:
        import ray

        started = time.perf_counter()
        worker = self.actor_class.remote(self.config, [])
        ray.get(worker.counters.remote())  # constructed: bundle loaded, groups checked
        self.result.worker_start_s.append(round(time.perf_counter() - started, 3))
        self.workers.append(worker)
        self.runs.append(worker.run.remote())
        self.result.workers_peak = max(self.result.workers_peak, len(self.workers))

    def _rebalance(self) -> None:
        """Shrinks every owner to its new share first, then grows: never two owners at once."""
        plan = assignment(self.stream.partitions, len(self.workers))
        current = [_when_available(w.counters) for w in self.workers]
        for worker, now, share in zip(self.workers, current, plan, strict=True):
            _when_available(worker.assign, sorted(set(now["partitions"]) & set(share)))
        for worker, share in zip(self.workers, plan, strict=True):
            _when_available(worker.assign, share)

    def revive(self) -> None:
        """A worker whose process died (Ray restarts the actor) gets its loop and partitions
        back; what it left pending is read first."""
        import ray

        finished, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        for ref in finished:
            index = self.runs.index(ref)
            try:
                self._collect(ray.get(ref))
            except Exception as error:  # noqa: BLE001 - a lost process or a bug: a new loop
                self.result.scale_events.append(f"worker {index} lost: {type(error).__name__}")
            _when_available(self.workers[index].counters)  # back (restarted) before its loop
            self.runs[index] = self.workers[index].run.remote()
        if finished:
            self._rebalance()

    def rescale(self, lag: int) -> None:
        """One worker more above `scale_up_lag`, one fewer after a quiet spell below
        `scale_down_lag`, within the configured bounds."""
        import ray

        now = time.monotonic()
        if lag > self.stream.scale_up_lag and len(self.workers) < self.stream.max_workers:
            self._add()
            self._rebalance()
            self.result.scale_events.append(f"up to {len(self.workers)} at lag {lag}")
            self.low_since = None
            return
        if lag >= self.stream.scale_down_lag or len(self.workers) <= self.stream.min_workers:
            self.low_since = None
            return
        self.low_since = self.low_since or now
        if now - self.low_since >= self.stream.scale_down_after_s:
            victim, run = self.workers.pop(), self.runs.pop()
            _when_available(victim.assign, [])
            self._rebalance()
            victim.stop.remote()
            self._collect(ray.get(run))
            ray.kill(victim)
            self.result.scale_events.append(f"down to {len(self.workers)} at lag {lag}")
            self.low_since = None

    def _collect(self, counters: dict) -> None:
        for name in ("scored", "dead", "late", "duplicates"):
            setattr(self.result, name, getattr(self.result, name) + counters[name])

    def stop(self) -> StreamResult:
        import ray

        for worker in self.workers:
            worker.stop.remote()
        for worker, run in zip(self.workers, self.runs, strict=True):
            try:
                self._collect(ray.get(run, timeout=60))
            except Exception as error:  # noqa: BLE001 - a lost worker is reported, not raised
                console.print(f"[yellow]stream worker ended abnormally: {error}")
            ray.kill(worker)
        self.workers, self.runs = [], []
        return self.result


def run_stream(
    config,
    seconds: float | None = None,
    until_idle: float | None = None,
    quiet: bool = False,
    hooks: tuple = (),
    config_path: str | None = None,
    root: str | None = None,
) -> StreamResult:
    """Streams until `seconds` pass, or the lag has been 0 for `until_idle` seconds, or
    Ctrl-C. `hooks` are callables run once per second on the driver. With `config_path`, the
    feedback loop (labels, live quality, retraining) runs beside it on the driver."""
    from jobs.feedback import run_feedback
    from jobs.ray_runtime import init_ray
    from jobs.stream_metrics import serve_metrics

    connect(config.stream.redis_url)  # a wrong URL fails before Ray starts
    init_ray(config)
    coordinator = Coordinator(config)
    storage = Storage(config.s3)
    started = time.monotonic()
    try:
        client = connect(config.stream.redis_url)
        metrics = serve_metrics(config, client, addr=config.stream.metrics_host)
    except OSError as error:
        raise StreamError(f"stream.metrics_port {config.stream.metrics_port}: {error}") from None
    stopping = threading.Event()
    feedback = None
    if config_path is not None:
        feedback = threading.Thread(
            target=run_feedback,
            args=(config, connect(config.stream.redis_url), root or ".", config_path),
            kwargs={"block_ms": 200, "stop": stopping.is_set},
            daemon=True,
        )
        feedback.start()
    coordinator.start()
    idle_since, printed, labels = None, 0.0, coordinator.keys.labels
    try:
        while True:
            lag = consumer_lag(coordinator.client, coordinator.keys, config.stream.group)
            coordinator.revive()
            coordinator.rescale(lag)
            coordinator.result.score_files += flush_scores(config, coordinator.client, storage)
            for hook in hooks:
                hook(coordinator)
            elapsed = time.monotonic() - started
            if not quiet and time.monotonic() - printed >= 5:
                printed = time.monotonic()
                _print_progress(coordinator, lag, elapsed)
            if feedback is not None:  # labels still to join count as work too
                lag += consumer_lag(coordinator.client, coordinator.keys, "feedback", [labels])
            idle_since = (idle_since or time.monotonic()) if lag == 0 else None
            if (
                until_idle is not None
                and idle_since
                and time.monotonic() - idle_since >= until_idle
            ):
                break
            if seconds is not None and elapsed >= seconds:
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        console.print("stream: stopping (Ctrl-C); in-flight batches finish first")
    stopping.set()
    result = coordinator.stop()
    if feedback is not None:
        feedback.join(timeout=10)
    if metrics is not None:
        metrics.shutdown()
    result.score_files += flush_scores(config, coordinator.client, storage)
    stats = stream_stats(coordinator.client, coordinator.keys)  # lost workers' counts too
    for name in ("events", "scored", "dead", "late", "duplicates"):
        setattr(result, name, stats.get(name, 0))
    result.seconds = round(time.monotonic() - started, 2)
    return result


def stream_stats(client: redis.Redis, keys: StreamKeys) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(keys.stats).items()}


def _print_progress(coordinator: Coordinator, lag: int, elapsed: float) -> None:
    stats = stream_stats(coordinator.client, coordinator.keys)
    scored = stats.get("scored", 0)
    console.print(
        f"stream: {scored:,} scored · {stats.get('dead', 0):,} dead · "
        f"{stats.get('late', 0):,} late · lag {lag:,} · {len(coordinator.workers)} workers · "
        f"{scored / max(elapsed, 1e-9):,.0f} events/s"
    )


app = typer.Typer(help="Stream events through online features and the production model.")


@app.command("run")
def run_command(
    config: Annotated[str, typer.Option(help="Pipeline config YAML with a `stream:` section")],
    seconds: Annotated[float | None, typer.Option(help="stop after this long")] = None,
    until_idle: Annotated[
        float | None, typer.Option(help="stop once nothing is pending for this long")
    ] = None,
) -> None:
    """Runs the stream workers until stopped."""
    loaded = _stream_config(config)
    for name, value in (("--seconds", seconds), ("--until-idle", until_idle)):
        if value is not None and not value >= 0:
            raise ConfigError(f"{name} must be a number of seconds >= 0, not {value}")
    result = run_stream(
        loaded, seconds=seconds, until_idle=until_idle, config_path=config, root=os.getcwd()
    )
    summary = {k: v for k, v in asdict(result).items() if k != "feedback"}
    console.print("stream: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


def bootstrap_state(
    config, run_uri: str | None = None, exclude_split: str | None = None, force: bool = False
) -> dict:
    """Loads the online state from a run's ingested fact rows (default: the run of the model
    the stream scores with), leaving out one split's rows when asked (a replay of them
    then starts where the batch features did)."""
    import pyarrow.compute as pc

    from jobs.feature_state import FeatureState, bootstrap
    from jobs.registry import load_bundle

    storage = Storage(config.s3)
    registry_uri = join(config.storage, "registry")
    bundle = load_bundle(storage, registry_uri, config.name, config.stream.alias)
    run_uri = run_uri or bundle.lineage.get("run_uri")
    if not run_uri:
        raise ConfigError(f"model {config.name} v{bundle.version} names no run: pass --run")
    if bundle.spec.features.history is None:
        raise ConfigError("the model has no history features: there is no state to load")
    table = storage.read_table_dir(join(run_uri, "ingest", config.fact))
    key = bundle.spec.source.primary_key
    if exclude_split:
        held = storage.read_table_dir(join(run_uri, "features", f"{exclude_split}_raw"))
        keep = pc.invert(pc.is_in(table.column(key), value_set=held.column(key)))
        table = table.filter(keep)
    client = connect(config.stream.redis_url)
    applied = stream_stats(client, StreamKeys.of(config)).get("events", 0)
    if applied and not force:
        raise StreamError(
            f"the stream has already applied {applied:,} events to this state: a bootstrap "
            "would roll those customers back (--force to overwrite anyway)"
        )
    state = FeatureState(client, StreamKeys.of(config).prefix, bundle.spec.features, config.stream)
    started = time.perf_counter()
    events = bootstrap(state, table, bundle.spec.features, key)
    return {"events": events, "run": run_uri, "seconds": round(time.perf_counter() - started, 2)}


@app.command("bootstrap")
def bootstrap_command(
    config: Annotated[str, typer.Option(help="Pipeline config YAML with a `stream:` section")],
    run: Annotated[str | None, typer.Option(help="run folder (default: the model's run)")] = None,
    exclude_split: Annotated[
        str | None, typer.Option(help="leave out this split's rows (test: replay them later)")
    ] = None,
    force: Annotated[bool, typer.Option(help="overwrite a state the stream has moved")] = False,
) -> None:
    """Loads the online feature state from a pipeline run's events."""
    loaded = _stream_config(config)
    done = bootstrap_state(loaded, run, exclude_split, force)
    console.print(
        f"online state: {done['events']:,} events of {done['run']} applied in {done['seconds']} s"
    )


def _stream_config(path: str):
    loaded = load_config(path)
    if loaded.stream is None:
        raise ConfigError(f"{path} has no `stream:` section (see configs/fraud.yaml)")
    return loaded


app.command("replay")(replay_command)


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
