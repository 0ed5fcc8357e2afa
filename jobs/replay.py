"""Replay: feed recorded or generated fact records into the event streams at a chosen rate.

For demos and benchmarks (`rayline stream replay`). Records come from the fact source (or another
URI in its format), generated sample data, or a pipeline run: its clean fact table, or the rows
it put in its test split (`features/test_raw` keeps their keys). One message per record: field
`record` = JSON in the standard column names, no label, times as ISO-8601 text; `enqueued_at` =
epoch seconds. Sent to the entity's partition in (event time, primary key) order, the batch
point-in-time order; labels can follow on the labels stream. Source rows are standardized like
ingest does but not filtered: rows ingest would quarantine go out too (`invalid`). No Ray here.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated

import pyarrow as pa
import pyarrow.compute as pc
import redis
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from jobs import validate
from jobs.config import Config, load_config
from jobs.entrypoint import run_cli
from jobs.errors import RaylineError, StorageError
from jobs.featurespec import ROW_KEY, online_source, row_key
from jobs.pii import pii_key
from jobs.sources import READ_ERRORS, probe, read_file
from jobs.storage import Storage, join
from jobs.stream_keys import StreamKeys

BATCH = 500  # XADDs per pipeline when unpaced
TICK_S = 0.01  # a paced sender sends about this much time's worth of events per pipeline
BURST_S = 0.05  # the token bucket holds at most this much time's worth of events
COMPACT = (",", ":")  # JSON separators


class ReplayError(RaylineError, ValueError):
    """Replay cannot start or go on; the message names the option, URI, field or broker."""


@dataclass
class ReplayResult:
    source: str  # what was replayed, in words
    events: int
    labels: int
    partitions: dict[int, int]  # partition -> events sent to it
    seconds: float  # first event sent to last message (labels included)
    rate: float  # events per second over the events' own send window
    invalid: int = 0  # rows ingest would quarantine (row rules; references and uniqueness aside)
    bad_files: dict[str, str] = field(default_factory=dict)


class TokenBucket:
    """`rate` tokens a second on `time.monotonic()`, at most `capacity` saved up (a burst after
    a stall); `take(n)` waits until n are there. Starts empty: the rate holds from the start."""

    def __init__(self, rate: float, capacity: float, clock=time.monotonic, sleep=time.sleep):
        self.rate, self.capacity = rate, max(capacity, 1.0)
        self.clock, self.sleep = clock, sleep
        self.tokens, self.last = 0.0, clock()

    def take(self, count: int) -> None:
        while True:
            now = self.clock()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
            need = min(count, self.capacity)  # more than a burst: wait for a burst, owe the rest
            if self.tokens >= need - 1e-9:  # float residue must not spin on a 1e-17 s sleep
                self.tokens -= count
                return
            self.sleep((need - self.tokens) / self.rate)


def _check_options(config: Config, rate, limit, rows, delay, split, chosen: list[str]) -> None:
    if split and "run_uri" not in chosen:
        chosen = [*chosen, "split"]
    problems = {
        f"config {config.name!r} has no `stream:` section": config.stream is None,
        f"config {config.name!r}: features.timestamp is not set; replay orders by event time": (
            not config.features.timestamp
        ),
        f"rate must be a positive number of events per second (got {rate})": (
            rate is not None and not rate > 0
        ),
        f"limit must be at least 1 (got {limit})": limit is not None and limit < 1,
        f"generate must be at least 1 row (got {rows})": rows is not None and rows < 1,
        f"label delay must be >= 0 seconds (got {delay})": not delay >= 0,
        f"split {split!r}: a run records only its 'test' split": split not in (None, "test"),
        f"choose one input: a source URI, generated rows or a run (got {chosen})": len(chosen) > 1,
    }
    for problem, failed in problems.items():
        if failed:
            raise ReplayError(problem)


def read_source(config: Config, uri: str, storage: Storage) -> tuple[pa.Table, int, dict]:
    """The fact source's files under `uri`, standardized (standard names and types) with the
    ingest readers; returns the rows, how many ingest would quarantine, and unreadable files."""
    source = config.sources[config.fact].model_copy(update={"uri": uri})
    files, bad = probe(storage, config.fact, source)  # missing URI / unmapped column: one line
    tables, invalid = [], 0
    checks = online_source(source, config.features.label)
    for file in files:
        try:
            raw, _ = read_file(storage, file, source, pii_key(config))
        except READ_ERRORS as error:
            bad[file] = f"unreadable {source.format} file: {str(error).splitlines()[0][:200]}"
            continue
        table, reasons = validate.standardize(raw, source)
        if validate.REASON in raw.column_names:  # text lines the reader could not parse
            reasons = pc.coalesce(raw.column(validate.REASON), reasons)
        invalid += pc.sum(pc.is_valid(validate.check_rows(table, checks, reasons))).as_py() or 0
        tables.append(table)
    if not tables:
        raise ReplayError(f"none of the files under {uri} can be read: {bad}")
    return pa.concat_tables(tables), invalid, bad


def read_run(config: Config, run_uri: str, split: str | None, storage: Storage) -> pa.Table:
    """A run's clean fact table (what its features were computed on), or only its test rows:
    `features/test_raw` keeps the primary key (or the row key) of every test row."""
    fact = config.sources[config.fact]
    key = fact.primary_key or ROW_KEY
    clean_uri = join(run_uri, "ingest", config.fact)
    try:
        table = storage.read_table_dir(clean_uri)
    except StorageError:
        raise ReplayError(f"run {run_uri}: no clean {config.fact!r} rows at {clean_uri}") from None
    table = row_key(table, fact)  # the key `jobs.features` gives rows without a primary key
    if split == "test":
        test_uri = join(run_uri, "features", "test_raw")
        try:
            keys = storage.read_table_dir(test_uri).column(key)
        except StorageError:
            raise ReplayError(f"run {run_uri} recorded no test split at {test_uri}") from None
        table = table.filter(pc.is_in(table.column(key), value_set=keys.combine_chunks()))
    return table


def load_events(config: Config, storage: Storage, **options) -> tuple[pa.Table, str, int, dict]:
    """The rows to replay, sorted by (event time, primary key), nulls last; with what they are."""
    source_uri, rows = options.get("source_uri"), options.get("generate_rows")
    run_uri, split = options.get("run_uri"), options.get("split")
    invalid, bad = 0, {}
    runs = join(config.storage, "runs")
    if split and not run_uri:  # the latest run with a test split
        done = [r for r in storage.list_dirs(runs) if storage.exists(join(runs, r, "features"))]
        if not done:
            raise ReplayError(f"no pipeline run with a test split under {runs}: pass --run")
        run_uri = join(runs, done[-1])
    if run_uri:
        table = read_run(config, run_uri, split, storage)
        what = f"{'test split' if split else 'clean rows'} of run {run_uri}"
    elif rows:
        from jobs.data import generate

        with tempfile.TemporaryDirectory(prefix="rayline-replay-") as folder:
            generate(folder, rows=rows, days=max(1, min(30, rows // 2000)), seed=config.seed)
            table, invalid, bad = read_source(config, join(folder, "transactions"), storage)
        what = f"{rows:,} generated rows"
    else:
        uri = source_uri or config.sources[config.fact].uri
        table, invalid, bad = read_source(config, uri, storage)
        what = uri
    names = (config.features.timestamp, config.sources[config.fact].primary_key or ROW_KEY)
    order = [(name, "ascending", "at_end") for name in names if name in table.column_names]
    indices = pc.sort_indices(table, sort_keys=order)
    return table.take(indices), what, invalid, bad


def _records(table: pa.Table, config: Config) -> pa.Table:
    """The message bodies' columns: the online source's (no label), dates/times as ISO text."""
    types = online_source(config.sources[config.fact], config.features.label).types
    columns = {}
    for name in [name for name in types if name in table.column_names]:  # not dropped PII
        column, kind = table.column(name), types[name]
        if kind in ("timestamp", "date"):
            column = pc.strftime(column, "%Y-%m-%dT%H:%M:%S" if kind == "timestamp" else "%Y-%m-%d")
        columns[name] = column
    return pa.table(columns)


def replay(
    config: Config,
    *,
    source_uri: str | None = None,
    generate_rows: int | None = None,
    rate: float | None = None,
    limit: int | None = None,
    split: str | None = None,
    run_uri: str | None = None,
    with_labels: bool = False,
    label_delay_s: float = 0.0,
    client=None,
    on_progress=None,
) -> ReplayResult:
    """Sends the fact records to their partition streams at `rate` events/s (None: at once).

    Args:
        config: the pipeline config; its `stream:` names the broker, prefix and partitions.
        source_uri: another URI in the fact source's format (default: the fact source).
        generate_rows: replay this many generated sample rows (`jobs.data.generate`) instead.
        rate: events per second, paced by a token bucket; None sends as fast as Redis takes.
        limit: send at most this many events (the earliest).
        split: "test": only the rows a run put in its test split (default run: the latest).
        run_uri: a pipeline run's folder: replay its clean rows (or, with split, its test rows).
        with_labels: also send each record's label to the labels stream, `label_delay_s` later.
        client: a redis-py client (default: one for `stream.redis_url`).
        on_progress: called with (events sent, events to send) after each pipeline.
    """
    options = dict(source_uri=source_uri, generate_rows=generate_rows, run_uri=run_uri)
    chosen = [name for name, value in options.items() if value]
    _check_options(config, rate, limit, generate_rows, label_delay_s, split, chosen)
    fact = config.sources[config.fact]
    if with_labels and not fact.primary_key:
        raise ReplayError(f"labels need a primary key: source {config.fact!r} declares none")
    storage = Storage(config.s3)
    table, what, invalid, bad = load_events(config, storage, split=split, **options)
    if limit is not None:
        table = table.slice(0, limit)
    keys = StreamKeys.of(config)
    history = config.features.history
    entity = history.entity if history else fact.primary_key
    entities = table.column(entity).to_pylist() if entity else [None] * table.num_rows
    partitions = [keys.partition(value) for value in entities]
    streams = keys.all_events()
    records = _records(table, config)
    label = [fact.primary_key, config.features.label]
    labels = table.select(label).to_pylist() if with_labels else []
    client = client or redis.Redis.from_url(config.stream.redis_url)
    result = ReplayResult(what, 0, 0, {}, 0.0, 0.0, invalid, bad)
    try:
        plan = (rate, label_delay_s, on_progress)
        return _send(client, keys, streams, records, partitions, labels, plan, result)
    except redis.RedisError as error:
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise ReplayError(f"redis at {config.stream.redis_url}: {first}") from None


def _send(client, keys, streams, records, partitions, labels, plan, result):
    """Pipelines of XADDs, paced per pipeline. A pipeline's labels queue as (due time, messages),
    due `delay` after it was answered, and go with the first pipeline after (no sleep per row)."""
    rate, delay, on_progress = plan
    total = records.num_rows
    chunk = BATCH if rate is None else max(1, min(BATCH, round(rate * TICK_S)))
    bucket = TokenBucket(rate, max(chunk, rate * BURST_S)) if rate else None
    counts = [0] * len(streams)
    waiting: deque[tuple[float, list[str]]] = deque()
    start = time.monotonic()
    for offset in range(0, total, chunk):
        size = min(chunk, total - offset)
        if bucket:
            bucket.take(size)
        pipe = client.pipeline(transaction=False)
        enqueued = repr(time.time())
        for i, row in enumerate(records.slice(offset, size).to_pylist(), offset):
            body = json.dumps(row, separators=COMPACT)  # inf as Infinity: workers reject it
            pipe.xadd(streams[partitions[i]], {"record": body, "enqueued_at": enqueued})
            counts[partitions[i]] += 1
        result.labels += _due_labels(pipe, keys, waiting, time.monotonic())
        pipe.execute()
        result.events += size
        if labels:
            messages = [json.dumps(x, separators=COMPACT) for x in labels[offset : offset + size]]
            waiting.append((time.monotonic() + delay, messages))
        if on_progress:
            on_progress(result.events, total)
    sent = time.monotonic()
    while waiting:
        time.sleep(max(0.0, waiting[0][0] - time.monotonic()))
        pipe = client.pipeline(transaction=False)
        result.labels += _due_labels(pipe, keys, waiting, time.monotonic())
        pipe.execute()
    result.seconds = time.monotonic() - start
    result.rate = result.events / max(sent - start, 1e-9)
    result.partitions = {p: n for p, n in enumerate(counts) if n}
    return result


def _due_labels(pipe, keys: StreamKeys, waiting: deque, now: float) -> int:
    count = 0
    while waiting and waiting[0][0] <= now:
        for message in waiting.popleft()[1]:
            pipe.xadd(keys.labels, {"record": message})
            count += 1
    return count


def summary_line(result: ReplayResult) -> str:
    spread = ", ".join(f"{p}: {n:,}" for p, n in sorted(result.partitions.items())) or "-"
    labels = f" + {result.labels:,} labels" if result.labels else ""
    invalid = f"; {result.invalid:,} invalid rows (workers reject them)" if result.invalid else ""
    bad = f"; {len(result.bad_files)} unreadable files skipped" if result.bad_files else ""
    return (
        f"replayed {result.events:,} events{labels} from {result.source} in {result.seconds:.2f} s:"
        f" {result.rate:,.0f} events/s; per partition {spread}{invalid}{bad}"
    )


def replay_command(
    config: Annotated[str, typer.Option(help="Pipeline config YAML (with a `stream:` section)")],
    rate: Annotated[float | None, typer.Option(help="Events per second (default: at once)")] = None,
    limit: Annotated[int | None, typer.Option(help="Send at most this many events")] = None,
    source: Annotated[str | None, typer.Option(help="URI in the fact source's format")] = None,
    generate: Annotated[int | None, typer.Option(help="Replay this many generated rows")] = None,
    split: Annotated[str | None, typer.Option(help="'test': a run's test split only")] = None,
    run: Annotated[str | None, typer.Option(help="Pipeline run folder (default: latest)")] = None,
    labels: Annotated[bool, typer.Option(help="Also send labels to the labels stream")] = False,
    label_delay: Annotated[float, typer.Option(help="Seconds from a record to its label")] = 0.0,
) -> None:
    """Replay the fact source (or generated rows, or a run's test split) into the event streams."""
    quiet = os.environ.get("RAYLINE_QUIET", "") not in ("", "0")
    columns = (TextColumn("[bold]replay"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress = Progress(*columns, console=Console(stderr=True), disable=quiet)

    def report(sent: int, total: int) -> None:  # the bar starts with the first send, so bad
        if not progress.tasks:  # input before it stays one line
            progress.start()
            progress.add_task("replay", total=total)
        progress.update(progress.task_ids[0], completed=sent)

    try:
        result = replay(
            load_config(config),
            source_uri=source,
            generate_rows=generate,
            rate=rate,
            limit=limit,
            split=split,
            run_uri=run,
            with_labels=labels,
            label_delay_s=label_delay,
            on_progress=report,
        )
    finally:
        if progress.tasks:  # stopping a bar that never started prints an empty line
            progress.stop()
    typer.echo(summary_line(result))


if __name__ == "__main__":
    run_cli(replay_command)
