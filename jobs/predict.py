"""Predict: score raw records with a registered bundle, online or in batch.

`score_records` is the one scoring path: the HTTP endpoint calls it for a request, and batch
inference calls it for each Ray Data batch inside an actor that loads the bundle once. Batch
input is read by the same readers as ingest (`jobs.sources`), one Ray task per file: a line that
does not parse or decode, or a row that fails the fact source's rules, is written to
`quarantine/` with its reason, and an unreadable file is named in the result; nothing is lost.

With `online_state`, history and window features come from the online feature state in Redis
(`jobs.feature_state`, what the stream side keeps current) instead of the bundle's snapshot:
`OnlineState` is the one reader Serve and batch inference share, one round trip per call.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import redis
import typer
from ray.data.expressions import col
from ray.util.annotations import RayDeprecationWarning

from jobs import validate
from jobs.config import Config, load_config
from jobs.entrypoint import run_cli
from jobs.errors import ConfigError, SourceError, StreamError
from jobs.feature_state import FeatureState
from jobs.featurespec import enrich, feature_matrix, online_source, transform
from jobs.online import with_state
from jobs.pii import pii_key
from jobs.ray_runtime import init_ray
from jobs.registry import Bundle, load_bundle
from jobs.scoring import model_scores
from jobs.sources import read_file
from jobs.storage import Storage, join
from jobs.stream_keys import StreamKeys
from jobs.validate import REASON, RECORD


@dataclass
class PredictResult:
    output_uri: str
    quarantine_uri: str
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    model: str
    version: int
    bad_files: dict[str, str]


def redact(url: str) -> str:
    """A broker URL fit for a message: its password (if any) masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class OnlineState:
    """A process's reader of the online feature state: one Redis client, and per bundle a
    read-only `state` callback for `OnlineScorer` and `score_records`. One call reads the
    distinct entities of its rows in one pipelined round trip and changes nothing (each row
    sees the stored state, `advance=False`). Redis unreachable: a `StreamError` naming the
    broker; the client reconnects by itself on a later call once Redis is back."""

    def __init__(self, stream, prefix: str, client: redis.Redis | None = None):
        self.stream, self.prefix, self.where = stream, prefix, redact(stream.redis_url)
        self.client = client or redis.Redis.from_url(
            stream.redis_url, socket_connect_timeout=2.0, socket_timeout=2.0
        )

    @classmethod
    def of(cls, config) -> OnlineState:
        if config.stream is None:
            raise ConfigError("the online feature state needs a `stream:` section (redis_url)")
        return cls(config.stream, StreamKeys.of(config).prefix)

    def unavailable(self, error: Exception) -> StreamError:
        reason = f"{type(error).__name__}: {str(error)[:200]}"
        return StreamError(f"online feature state unavailable: Redis at {self.where} ({reason})")

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as error:
            raise self.unavailable(error) from None

    def reader(self, features):
        """The `state` callback for bundles with these features (None without history)."""
        if features.history is None:
            return None
        state = FeatureState(self.client, self.prefix, features, self.stream)

        def prior(entities, amounts, seconds, null_time, reasons) -> dict:
            usable = [r is None and not t for r, t in zip(reasons, null_time, strict=True)]
            try:
                states = state.read([e for e, ok in zip(entities, usable, strict=True) if ok])
            except redis.RedisError as error:
                raise self.unavailable(error) from None
            moments = [None if t else int(s) for s, t in zip(seconds, null_time, strict=True)]
            ids = [""] * len(entities)
            step = state.step(states, entities, amounts, moments, ids, usable, advance=False)
            return {"count": step.count, "total": step.total, "last": step.last,
                    "windows": step.windows}  # fmt: skip

        return prior


def score_records(
    bundle: Bundle, records: pa.Table, raw_names: bool = False, state=None
) -> tuple[np.ndarray, pa.Array]:
    """Scores for every record and the reasons records fail validation (their scores are NaN).

    Binary: calibrated probabilities; multiclass: a row of class probabilities; regression:
    the predicted value (`jobs.scoring`). `state`: an `OnlineState.reader` callback, for
    history from the online state instead of the bundle's snapshot."""
    spec = bundle.spec
    enriched, reasons = enrich(records, spec, bundle.lookups, raw_names)
    if state is not None and spec.features.history is not None:
        enriched = with_state(enriched, reasons.to_pylist(), spec, state)
    matrix = feature_matrix(transform(enriched, spec), spec.feature_names)
    scores = model_scores(bundle.booster, matrix, spec.task, bundle.calibration)
    invalid = pc.is_valid(reasons).to_numpy(zero_copy_only=False)
    mask = invalid.reshape(-1, *([1] * (scores.ndim - 1)))
    return np.where(mask, np.nan, scores), reasons


def prediction_columns(bundle: Bundle, scores: np.ndarray) -> dict[str, pa.Array]:
    """Batch output columns per task (NaN / null where a row was quarantined)."""
    spec, valid = bundle.spec, ~np.isnan(scores.reshape(len(scores), -1)).any(axis=1)
    if spec.task == "binary":
        labels = np.where(valid, (np.nan_to_num(scores) >= bundle.threshold).astype(int), -1)
        return {
            "score": pa.array(scores, pa.float64(), from_pandas=True),
            "label": pa.array(labels, pa.int8()),
        }
    if spec.task == "multiclass":
        best = np.nan_to_num(scores).argmax(axis=1) if len(scores) else np.empty(0, int)
        names = [spec.classes[i] if ok else None for i, ok in zip(best, valid, strict=True)]
        columns = {"label": pa.array(names, pa.string())}
        for index, name in enumerate(spec.classes):
            columns[f"probability_{name}"] = pa.array(scores[:, index], from_pandas=True)
        return columns
    return {"prediction": pa.array(scores, pa.float64(), from_pandas=True)}


class BundleScorer:
    """A Ray Data actor: loads the bundle once, then scores batches of raw fact-source rows."""

    def __init__(self, storage: Storage, registry_uri: str, name: str, ref: str | int, state=None):
        self.bundle = load_bundle(storage, registry_uri, name, ref)
        self.key = self.bundle.spec.source.primary_key
        # (stream config, key prefix): read history from the online state, once per batch
        self.state = OnlineState(*state).reader(self.bundle.spec.features) if state else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        read_reasons = batch.column(REASON) if REASON in batch.column_names else None
        batch = batch.drop_columns([c for c in (REASON, RECORD) if c in batch.column_names])
        scores, reasons = score_records(self.bundle, batch, raw_names=True, state=self.state)
        if read_reasons is not None:  # a line that did not parse: its reason comes first
            reasons = pc.coalesce(read_reasons, reasons)
            unread = pc.is_valid(read_reasons).to_numpy(zero_copy_only=False)
            scores = np.where(unread.reshape(-1, *([1] * (scores.ndim - 1))), np.nan, scores)
        if self.key:  # the record's own id; without one, every input column is kept
            raw_key = next(
                (r for r, s in self.bundle.spec.source.rename.items() if s == self.key), self.key
            )
            keys = {self.key: pc.cast(batch.column(raw_key), pa.string())}
        else:
            keys = {name: batch.column(name) for name in batch.column_names}
        return pa.table(
            {
                **keys,
                **prediction_columns(self.bundle, scores),
                "reason": reasons,
                "model": pa.array([self.bundle.name] * batch.num_rows, pa.string()),
                "version": pa.array([self.bundle.version] * batch.num_rows, pa.int32()),
            }
        )


@ray.remote(num_returns=2)
def _read_input(storage: Storage, uri: str, source, key: bytes) -> tuple[pa.Table, str | None]:
    """One input file with ingest's readers: the block and None, or an empty block and why."""
    try:
        table, _ = read_file(storage, uri, source, key)
        validate.check_schema(table.column_names, source, "input", uri)
        return table, None
    except (OSError, ValueError, pa.ArrowException) as error:
        return pa.table({}), f"cannot read {uri}: {str(error).splitlines()[0][:300]}"


def predict(
    config: Config,
    input_uri: str,
    output_uri: str,
    ref: str | int = "production",
    storage: Storage | None = None,
    actors: int = 1,
    online_state: bool = False,
) -> PredictResult:
    """Scores every file under `input_uri` (the fact source's format and column names);
    with `online_state`, history from the online feature state (`stream.redis_url`)."""
    storage = storage or Storage(config.s3)
    state = None
    if online_state:  # fail before any Ray work: no `stream:`, or Redis not answering
        reader = OnlineState.of(config)
        reader.ping()
        state = (config.stream, reader.prefix)
    registry_uri = join(config.storage, "registry")
    source = config.sources[config.fact]
    source = online_source(source, config.features.label, raw_names=True)
    files = storage.list_files(input_uri)
    if not files:
        raise SourceError(f"no files under {input_uri}")
    # Resolve and verify the bundle here, once: a missing version or a tampered file is one
    # clear error before any Ray work, and every actor scores with the same version.
    version = load_bundle(storage, registry_uri, config.name, ref).version
    key = pii_key(config)
    init_ray(config)
    # Read before the scoring actors take their CPUs (a read task must never wait behind them).
    outputs = [_read_input.remote(storage, uri, source, key) for uri in files]
    statuses = ray.get([output[1] for output in outputs])
    bad_files = {uri: error for uri, error in zip(files, statuses, strict=True) if error}
    blocks = [output[0] for output, error in zip(outputs, statuses, strict=True) if not error]
    if not blocks:
        first = next(iter(bad_files.values()))
        raise SourceError(
            f"none of the {len(files)} files under {input_uri} can be read; first: {first}"
        )
    dataset = ray.data.from_arrow_refs(blocks)
    # max_restarts=0: a failing scorer is an error to report, not an actor to restart (Ray
    # also logs an error on the console for restartable actors with object-store arguments).
    # Ray 2.60 takes it only as a remote arg, which it flags as deprecated from 2.64 on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        scored = dataset.map_batches(
            BundleScorer,
            fn_constructor_kwargs={
                "storage": storage,
                "registry_uri": registry_uri,
                "name": config.name,
                "ref": version,
                "state": state,
            },
            batch_format="pyarrow",
            batch_size=None,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
            max_restarts=0,
        ).materialize()
    # Predicate expressions: Ray 2.60's string expressions reject `is null` ("Unsupported
    # comparison operator: Is"), so the string form never ran.
    valid = scored.filter(expr=col("reason").is_null()).drop_columns(["reason"])
    invalid = scored.filter(expr=col("reason").is_not_null())
    out_fs, out_path = storage.filesystem(output_uri)
    for name, part in (("predictions", valid), ("quarantine", invalid)):
        storage.delete(join(output_uri, name))  # a re-run replaces its output
        part.write_parquet(join(out_path, name), filesystem=out_fs, mode=ray.data.SaveMode.APPEND)
    rows_in, rows_bad = scored.count(), invalid.count()
    first = scored.take(1)
    return PredictResult(
        join(output_uri, "predictions"),
        join(output_uri, "quarantine"),
        rows_in,
        rows_in - rows_bad,
        rows_bad,
        config.name,
        int(first[0]["version"]) if first else version,
        bad_files,
    )


def main(
    config: Annotated[str, typer.Option(help="Pipeline config YAML")],
    input: Annotated[str, typer.Option(help="URI of raw records in the fact source's format")],
    output: Annotated[str, typer.Option(help="URI to write predictions/ and quarantine/ under")],
    ref: Annotated[str, typer.Option(help="alias or version")] = "production",
    online_state: Annotated[
        bool,
        typer.Option(
            "--online-state",
            help="history and window features from the online state in Redis "
            "(stream.redis_url) instead of the bundle's snapshot",
        ),
    ] = False,
) -> None:
    """Batch inference with a registered bundle."""
    from dataclasses import asdict

    from jobs.summary import print_rows

    result = predict(load_config(config), input, output, ref, online_state=online_state)
    print_rows("predict", {k: str(v) for k, v in asdict(result).items()})


if __name__ == "__main__":
    run_cli(main)
