"""Serving metrics, drift and request samples, exported through Ray's Prometheus endpoint.

Why this shape: a Ray metric call costs ~5 us in a replica and a replica may score thousands of
records a second, so the request path only appends a tuple to a deque (~0.5 us, measured in
`tests/test_monitoring.py`); one background thread per served version turns those into metric
updates about once a second, keeps a sliding window of feature rows, recomputes PSI against the
bundle's `reference.json` (`jobs.drift`) every `psi_every_s`, and writes sampled requests to
storage. Nothing in it can fail or block a request: errors are logged, samples are dropped.

API (one `Monitor` per served model version, created where the bundle is loaded):

    monitor = Monitor(bundle.name, bundle.version, bundle.reference, config.serve.monitoring,
                      storage, sample_uri(config.storage, config.serve.monitoring),
                      task=bundle.spec.task, feature_names=bundle.spec.feature_names)
    monitor.observe(route, status, seconds, features, scores, request_id, records, predictions)
    monitor.observe_batch(records)      # once per model call (a @serve.batch call)
    monitor.close()                     # when the version is swapped out or the replica stops
    count_request(model, version, route, status, seconds)  # rejected before a model is picked
    log.info(request_log(request_id=..., model=..., status=..., seconds=...))

`features` is the float32 matrix the model scored (spec.feature_names order), `scores` what the
response returns as scores (calibrated probabilities for binary, class probabilities for
multiclass, values for regression). Neither is copied: do not modify them afterwards.

Metrics (Ray adds the `ray_` prefix, Serve the deployment/replica/application tags):
- `ray_rayline_requests_total{model,version,route,status}` counter
- `ray_rayline_request_latency_seconds{model,version,route}` histogram, 1 ms - 2 s
- `ray_rayline_records_total{model,version}` counter: records scored
- `ray_rayline_batch_records{model,version}` histogram: records per model call
- `ray_rayline_score{model,version}` histogram of probabilities (binary: the score; multiclass:
  the first class); regression models have none: one metric name has one set of buckets per
  Ray node, so per-model value buckets are impossible. Instead, for every task with a reference:
- `ray_rayline_score_rank{model,version}` histogram: each score's position (0-1) in the
  reference score distribution, flat when scores have not drifted;
- `ray_rayline_feature_psi{model,version,feature}` and `ray_rayline_score_psi{model,version}`
  gauges over the last `drift_window` records (set once the window holds `min_psi_rows`).
At most `max_scores_per_tick` scores a tick are observed (a uniform sample beyond that), so the
score histograms' `_count` is not a record count (`rayline_records_total` is). Ray rebuilds
histograms from bucket midpoints, so every `_sum` is approximate; `_count` and buckets are exact.
Ray drops a gauge not refreshed for 2 report intervals, so the gauges are set again every tick.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import numpy as np

from jobs import drift
from jobs.serve_config import MonitoringConfig
from jobs.storage import Storage, join

logger = logging.getLogger("rayline.monitoring")

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0]
BATCH_BUCKETS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]
PROBABILITY_BUCKETS = [0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
RANK_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
MAX_PENDING = 100_000  # requests waiting for the thread; beyond that the oldest are dropped
MAX_PENDING_SAMPLES = 10_000
SAMPLES_PER_FILE = 1_000
SECRET_WORDS = ("authorization", "token", "secret", "password", "cookie", "api_key", "apikey")

_metrics_lock = threading.Lock()
_metrics: Any = None


class Metrics:
    """The process's Ray metric objects (created once: Ray registers a name per process)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        mv = ("model", "version")
        self.requests = Counter(
            "rayline_requests", "HTTP requests by status", (*mv, "route", "status")
        )
        self.latency = Histogram(
            "rayline_request_latency_seconds",
            "request latency inside the replica",
            LATENCY_BUCKETS,
            (*mv, "route"),
        )
        self.records = Counter("rayline_records", "records scored", mv)
        self.batch = Histogram("rayline_batch_records", "records per model call", BATCH_BUCKETS, mv)
        self.score = Histogram("rayline_score", "score probabilities", PROBABILITY_BUCKETS, mv)
        self.score_rank = Histogram(
            "rayline_score_rank", "score position in the reference scores", RANK_BUCKETS, mv
        )
        self.feature_psi = Gauge(
            "rayline_feature_psi", "PSI of a model input vs the training data", (*mv, "feature")
        )
        self.score_psi = Gauge("rayline_score_psi", "PSI of the scores vs training", mv)


def metrics() -> Metrics:
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            _metrics = Metrics()
        return _metrics


def count_request(model: str, version: int | str, route: str, status: int, seconds: float):
    """Counts a request no Monitor saw (e.g. 401/404/413/422 before a model was picked); ~10 us.
    Use model="" / version="" when unknown."""
    try:
        m = metrics()
        tags = {"model": model, "version": str(version), "route": route}
        m.requests.inc(1, {**tags, "status": str(status)})
        m.latency.observe(seconds, tags)
    except Exception:  # noqa: BLE001 - metrics never fail a request
        logger.exception("count_request failed")


def sample_uri(storage_root: str, monitoring: MonitoringConfig) -> str:
    """Where sampled requests go: `monitoring.sample_uri`, or <storage>/serving/samples."""
    return monitoring.sample_uri or join(storage_root, "serving", "samples")


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _redact(v)
            for k, v in value.items()
            if not any(word in str(k).lower().replace("-", "_") for word in SECRET_WORDS)
        }
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    if isinstance(value, str) and value[:7].lower() == "bearer ":
        return "[redacted]"
    return value


def request_log(**fields: Any) -> str:
    """One JSON line for a request log: `time` plus `fields`, without anything that looks like
    a credential (keys naming a token, authorization, secret, password, cookie or API key, at
    any depth, and `Bearer ...` values)."""
    payload = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
    payload.update(_redact(fields))
    return json.dumps(payload, default=str, separators=(",", ":"))


class _Window:
    """The last `size` rows of a 2-D float32 stream, as a ring buffer."""

    def __init__(self, size: int, columns: int):
        self.rows = np.empty((size, columns), np.float32)
        self.position = self.filled = 0

    def add(self, block: np.ndarray) -> None:
        size = len(self.rows)
        block = block[-size:]
        first = min(len(block), size - self.position)
        self.rows[self.position : self.position + first] = block[:first]
        self.rows[: len(block) - first] = block[first:]
        self.position = (self.position + len(block)) % size
        self.filled = min(size, self.filled + len(block))

    def values(self) -> np.ndarray:
        return self.rows[: self.filled]


class Monitor:
    """Metrics, drift and request samples for one served model version (see module docstring).

    Args:
        reference: the bundle's `reference.json` (`Bundle.reference`); None: no drift metrics.
        task: the bundle's task (binary, multiclass, regression): what `rayline_score` holds.
        feature_names: the columns of `features`; default: the reference's feature order.
        sink: the metric objects (tests pass fakes); default: the process's Ray metrics.
        tick_s, psi_every_s, sample_flush_s: how often the thread updates metrics, recomputes
            PSI and writes a file of samples (also when SAMPLES_PER_FILE are waiting).
    """

    def __init__(
        self,
        model: str,
        version: int,
        reference: dict | None,
        config: MonitoringConfig,
        storage: Storage,
        sample_uri: str,
        *,
        task: str = "binary",
        feature_names: list[str] | None = None,
        tick_s: float = 1.0,
        psi_every_s: float = 10.0,
        sample_flush_s: float = 30.0,
        min_psi_rows: int = 100,
        max_scores_per_tick: int = 1000,
        sink: Metrics | None = None,
    ):
        self.model, self.version, self.task = model, version, task
        self.reference, self.config = reference, config
        self.storage, self.sample_uri = storage, sample_uri
        self.tick_s, self.psi_every_s, self.sample_flush_s = tick_s, psi_every_s, sample_flush_s
        self.min_psi_rows = min(min_psi_rows, config.drift_window)
        self.max_scores_per_tick = max_scores_per_tick
        self.metrics = sink or metrics()
        self.tags = {"model": model, "version": str(version)}
        self.feature_names = list(feature_names or (reference["features"] if reference else []))
        self.psi: dict[str, float] = {}  # the latest PSI per feature
        self.score_psi: float | None = None
        self.samples_written = self.samples_dropped = 0
        self._sample_rate = config.sample_rate
        self._pending: collections.deque = collections.deque(maxlen=MAX_PENDING)
        self._batches: collections.deque = collections.deque(maxlen=MAX_PENDING)
        self._samples: collections.deque = collections.deque(maxlen=MAX_PENDING_SAMPLES)
        self._lines: list[str] = []
        self._features = _Window(config.drift_window, len(self.feature_names))
        self._scores = _Window(config.drift_window, 1)
        self._new_rows = 0
        self._last_psi = self._last_write = time.monotonic()
        self._rng = np.random.default_rng()
        self._warned: set[str] = set()
        self._lock = threading.Lock()  # one tick at a time (the thread, close, flush)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"rayline-monitor-{model}-v{version}", daemon=True
        )
        self._thread.start()

    # --- the request path: appends only ------------------------------------------------------

    def observe(
        self,
        route: str,
        status: int,
        seconds: float,
        features: np.ndarray | None = None,
        scores: np.ndarray | None = None,
        request_id: str = "",
        records: list[dict] | None = None,
        predictions: list | None = None,
    ) -> None:
        """Records one request (any status); features/scores of the records it scored."""
        self._pending.append((route, status, seconds, features, scores))
        if records is not None and self._sample_rate and random.random() < self._sample_rate:
            self._samples.append((request_id, time.time(), records, predictions))

    def observe_batch(self, records: int) -> None:
        """Records one model call of `records` rows (a @serve.batch call)."""
        self._batches.append(records)

    # --- the background thread -------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.flush()

    def flush(self, force_write: bool = False) -> None:
        """Turns what the request path queued into metrics, PSI and sample files now (the
        thread does this every tick_s); never raises."""
        with self._lock:
            try:
                self._tick(force_write)
            except Exception as error:  # noqa: BLE001 - monitoring never fails serving
                self._warn(type(error).__name__, "monitoring tick failed")

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:  # once per kind of problem, not once per request
            self._warned.add(key)
            logger.warning("%s (%s v%s)", message, self.model, self.version, exc_info=True)

    def _drain(self, queue: collections.deque) -> list:
        items = []
        try:
            while True:
                items.append(queue.popleft())
        except IndexError:
            return items

    def _tick(self, force_write: bool) -> None:
        m, tags = self.metrics, self.tags
        counts: collections.Counter = collections.Counter()
        blocks, scores, records = [], [], 0
        width = len(self.feature_names)
        for route, status, seconds, features, score in self._drain(self._pending):
            counts[(route, status)] += 1
            m.latency.observe(seconds, {**tags, "route": route})
            if features is not None and len(features):
                if getattr(features, "ndim", 0) == 2 and features.shape[1] == width:
                    blocks.append(features)
                else:
                    self._warn("shape", f"features are not a matrix of {width} columns")
            if score is not None and len(score):
                scores.append(drift.score_column(score))
            if score is not None or features is not None:
                records += len(score if score is not None else features)
        if records:
            m.records.inc(records, tags)
        if blocks:
            self._features.add(np.concatenate(blocks))
            self._new_rows += sum(len(block) for block in blocks)
        for (route, status), count in counts.items():
            m.requests.inc(count, {**tags, "route": route, "status": str(status)})
        for size in self._drain(self._batches):
            m.batch.observe(size, tags)
        if scores:
            self._observe_scores(np.concatenate(scores))
        if self._new_rows and time.monotonic() - self._last_psi >= self.psi_every_s:
            self._compute_psi()
        for name, value in self.psi.items():  # refreshed every tick, or Ray drops them
            m.feature_psi.set(value, {**tags, "feature": name})
        if self.score_psi is not None:
            m.score_psi.set(self.score_psi, tags)
        self._write_samples(force_write)

    def _observe_scores(self, values: np.ndarray) -> None:
        self._scores.add(values.reshape(-1, 1))
        self._new_rows += len(values)
        if len(values) > self.max_scores_per_tick:
            values = self._rng.choice(values, self.max_scores_per_tick, replace=False)
        tags = self.tags
        if self.task != "regression":
            for value in values.tolist():
                self.metrics.score.observe(value, tags)
        reference_score = (self.reference or {}).get("score")
        if reference_score:
            for rank in drift.score_rank(reference_score, values).tolist():
                self.metrics.score_rank.observe(rank, tags)

    def _compute_psi(self) -> None:
        self._last_psi, self._new_rows = time.monotonic(), 0
        if not self.reference or self._features.filled < self.min_psi_rows:
            return
        self.psi = drift.feature_psi(self.reference, self._features.values(), self.feature_names)
        reference_score = self.reference.get("score")
        if reference_score and self._scores.filled >= self.min_psi_rows:
            self.score_psi = drift.psi(reference_score, self._scores.values()[:, 0])

    def _write_samples(self, force: bool) -> None:
        for request_id, seconds, records, predictions in self._drain(self._samples):
            line = {
                "request_id": request_id,
                "time": datetime.fromtimestamp(seconds, timezone.utc).isoformat(),
                "model": self.model,
                "version": self.version,
                "records": records,
                "predictions": predictions,
            }
            try:
                self._lines.append(json.dumps(line, default=str, separators=(",", ":")))
            except (TypeError, ValueError):
                self.samples_dropped += 1
        due = time.monotonic() - self._last_write >= self.sample_flush_s
        if not self._lines or not (force or due or len(self._lines) >= SAMPLES_PER_FILE):
            return
        lines, self._lines = self._lines, []
        self._last_write = time.monotonic()
        now = datetime.now(timezone.utc)
        uri = join(
            self.sample_uri,
            f"model={self.model}",
            f"version={self.version}",
            f"date={now:%Y-%m-%d}",
            f"{now:%H%M%S}-{uuid.uuid4().hex[:12]}.jsonl",
        )
        try:
            self.storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())
            self.samples_written += len(lines)
        except Exception:  # noqa: BLE001 - a storage outage loses samples, not requests
            self.samples_dropped += len(lines)
            self._warn("storage", f"could not write request samples to {uri}")

    def close(self, timeout: float = 10.0) -> None:
        """Stops the thread, then records and writes everything still queued (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.flush(force_write=True)
