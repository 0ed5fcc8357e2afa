"""Prometheus metrics of the streaming side, read from Redis when Prometheus scrapes.

A custom collector keeps no state of its own: each scrape reads the consumer groups
(`XINFO GROUPS`: lag and pending per partition), the counters in `keys.stats`, the window of
labelled predictions (live precision, recall, PR-AUC per model version), the score PSI
against the production bundle's reference, and the retraining record. Any process with
access to Redis can serve them (`serve_metrics`), so a worker restart loses no counts.
"""

from __future__ import annotations

import time
from collections import defaultdict

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jobs.feedback import (
    GROUP,
    feedback_pairs,
    live_quality,
    production_reference,
    score_psi,
    text,
)
from jobs.stream_events import undelivered
from jobs.stream_keys import StreamKeys

PREFIX = "rayline_stream_"
QUALITY = {
    "precision": "precision of the stored 0/1 decisions over the labelled window",
    "recall": "recall of the stored 0/1 decisions over the labelled window",
    "pr_auc": "PR-AUC (average precision) of the scores over the labelled window",
    "labels": "labelled predictions in the window",
    "positives": "positive labels in the window",
}


class StreamCollector(Collector):
    """Yields the stream's gauges and counters from Redis at scrape time.

    Args:
        reference_loader: returns (model, version, reference.json) of the bundle scores are
            compared with; default: the config's `stream.alias` bundle from the registry,
            re-read at most every `stream.refresh_s` seconds.
    """

    def __init__(self, config, client: redis.Redis, reference_loader=None):
        self.config, self.client = config, client
        self.keys = StreamKeys.of(config)
        self.loader = reference_loader or (lambda: production_reference(config))
        self._reference: tuple | None = None
        self._loaded_at = float("-inf")

    def describe(self):
        return []  # registering must not read Redis

    def reference(self) -> tuple | None:
        if time.monotonic() - self._loaded_at >= self.config.stream.refresh_s:
            self._loaded_at = time.monotonic()
            try:
                self._reference = self.loader()
            except Exception:  # no bundle yet: no PSI, the other metrics still flow
                self._reference = None
        return self._reference

    def collect(self):
        up = GaugeMetricFamily(PREFIX + "redis_up", "1 when Redis answered this scrape")
        try:
            families = list(self._families())
        except redis.RedisError:
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families

    def _families(self):
        keys, stream = self.keys, self.config.stream
        lag = GaugeMetricFamily(
            PREFIX + "consumer_lag",
            "entries not yet delivered to the consumer group (XINFO GROUPS lag)",
            labels=["partition", "group"],
        )
        pending = GaugeMetricFamily(
            PREFIX + "pending",
            "entries delivered but not acknowledged",
            labels=["partition", "group"],
        )
        streams = [(str(p), name, stream.group) for p, name in enumerate(keys.all_events())]
        streams.append(("labels", keys.labels, GROUP))
        for partition, name, group in streams:
            for info in self._groups(name):
                if text(info.get("name", "")) != group:
                    continue
                lag.add_metric([partition, group], float(undelivered(self.client, name, info)))
                pending.add_metric([partition, group], float(info.get("pending") or 0))
        yield lag
        yield pending

        for field, value in sorted(self.client.hgetall(keys.stats).items()):
            name = "".join(c if c.isalnum() else "_" for c in text(field))
            family = CounterMetricFamily(PREFIX + name, f"stream counter {text(field)!r}")
            family.add_metric([], float(value))
            yield family

        by_version = defaultdict(list)
        for pair in feedback_pairs(self.client, keys, stream.feedback.window):
            by_version[(str(pair.get("model", "")), str(pair.get("version", "")))].append(pair)
        quality = {
            name: GaugeMetricFamily(PREFIX + "live_" + name, help, labels=["model", "version"])
            for name, help in QUALITY.items()
        }
        for labels, pairs in sorted(by_version.items()):
            result = live_quality(None, None, self.config.task, pairs=pairs)
            result["labels"] = result["n"]
            for name, family in quality.items():
                if result.get(name) is not None:
                    family.add_metric(list(labels), float(result[name]))
        yield from quality.values()

        psi = GaugeMetricFamily(
            PREFIX + "score_psi",
            "PSI of the latest scores against the bundle's reference score distribution",
            labels=["model", "version"],
        )
        reference = self.reference()
        if reference is not None:
            model, version, ref = reference
            value = score_psi(self.client, keys, ref, stream.feedback.window, version)
            if value is not None:
                psi.add_metric([model, str(version)], value)
        yield psi

        retrain = {text(k): text(v) for k, v in self.client.hgetall(keys.retrain).items()}
        submissions = CounterMetricFamily(
            PREFIX + "retrain_submissions", "retraining jobs submitted with `ray job submit`"
        )
        submissions.add_metric([], float(retrain.get("submissions", 0)))
        yield submissions
        if "at" in retrain:
            last = GaugeMetricFamily(
                PREFIX + "retrain_last_submitted_seconds", "time of the last retraining submission"
            )
            last.add_metric([], float(retrain["at"]))
            yield last

    def _groups(self, name: str) -> list[dict]:
        try:
            return self.client.xinfo_groups(name)
        except redis.ResponseError:  # no such stream yet
            return []


def serve_metrics(
    config,
    client: redis.Redis,
    port: int | None = None,
    addr: str = "0.0.0.0",
    reference_loader=None,
):
    """Serves the stream's metrics on `port` (default `stream.metrics_port`; 0: none) from a
    private CollectorRegistry. Returns the HTTP server (call `.shutdown()` to stop), or None."""
    port = config.stream.metrics_port if port is None else port
    if not port:
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StreamCollector(config, client, reference_loader))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
