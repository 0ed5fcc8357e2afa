"""The `stream:` section of a pipeline config: broker, online feature state, workers, feedback.

Kept apart from jobs.config like `serve:`; jobs.config re-exports it. Every key has a default,
so `stream: {}` streams the config's fact source through Redis on loopback.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jobs.serve_config import Strict


class WindowFeature(Strict):
    """An event-time aggregate of the history amount over an entity's strictly earlier events:
    `sliding` covers (t - seconds, t), `tumbling` the current [k*seconds, (k+1)*seconds) bucket."""

    agg: Literal["count", "sum", "mean"]
    seconds: int = Field(gt=0, le=90 * 86400)
    kind: Literal["sliding", "tumbling"] = "sliding"


class FeedbackConfig(Strict):
    """Labels that arrive later, joined to predictions by the fact source's primary key."""

    window: int = Field(2000, ge=10, description="latest labelled predictions the metrics cover")
    label_wait_s: float = Field(
        60.0, ge=0, description="a label that comes before its prediction waits this long"
    )
    min_labels: int = Field(200, ge=1, description="labels needed before quality is judged")
    min_pr_auc: float | None = Field(None, ge=0, le=1, description="retrain below this")
    max_score_psi: float | None = Field(None, gt=0, description="retrain above this score PSI")
    retrain_command: str = Field(
        "python -m jobs.pipeline --config {config} --root {root}",
        description="what `ray job submit` runs; {config} and {root} are filled in",
    )
    retrain_address: str | None = Field(
        None, description="Ray dashboard address for `ray job submit`; default: RAY_ADDRESS"
    )
    cooldown_s: float = Field(3600, ge=0, description="least time between two retrainings")


class StreamConfig(Strict):
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="broker and feature state")
    prefix: str = Field("", description="key prefix; default: 'rayline:<config name>'")
    partitions: int = Field(4, ge=1, le=1024, description="event streams, keyed by entity")
    group: str = Field("rayline", description="consumer group of the scoring workers")
    batch_size: int = Field(256, ge=1, le=10000, description="events per read and model call")
    block_ms: int = Field(50, ge=1, le=10000, description="wait for new events per read")
    min_workers: int = Field(1, ge=1, description="Ray actors consuming the partitions")
    max_workers: int = Field(2, ge=1)
    scale_up_lag: int = Field(5000, ge=1, description="add a worker above this pending lag")
    scale_down_lag: int = Field(100, ge=0, description="remove one below this lag")
    scale_down_after_s: float = Field(30.0, ge=0, description="...held this long")
    worker_cpus: float = Field(1.0, gt=0, le=64)
    max_deliveries: int = Field(3, ge=1, description="then a message goes to dead letters")
    claim_idle_ms: int = Field(30000, ge=100, description="reclaim a dead consumer's messages")
    state_ttl_s: int = Field(30 * 86400, ge=60, description="per-entity state expires after")
    allowed_lateness_s: int = Field(0, ge=0, description="older than last event - this: late")
    window_idle_s: float = Field(60.0, gt=0, description="close idle keys' tumbling windows")
    prediction_ttl_s: int = Field(7 * 86400, ge=60, description="kept for joining labels")
    alias: str = Field("production", description="the bundle the workers score with")
    refresh_s: float = Field(5.0, gt=0, description="how often workers follow the alias")
    output_stream_maxlen: int = Field(1_000_000, ge=1000, description="approximate cap")
    sink_every: int = Field(1000, ge=1, description="scores per storage file")
    max_record_bytes: int = Field(65536, ge=256, description="larger records: dead letters")
    max_future_s: int = Field(86400, ge=0, description="later event times: dead letters")
    emit_features: bool = Field(False, description="model inputs in each scores entry")
    metrics_port: int = Field(0, ge=0, le=65535, description="0: no Prometheus endpoint")
    metrics_host: str = Field("127.0.0.1", description="0.0.0.0 to let other hosts scrape")
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)

    @model_validator(mode="after")
    def _bounds(self) -> StreamConfig:
        if self.min_workers > self.max_workers:
            raise ValueError("stream.min_workers must be at most stream.max_workers")
        if self.scale_down_lag >= self.scale_up_lag:
            raise ValueError("stream.scale_down_lag must be below stream.scale_up_lag")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("stream.redis_url must be redis://, rediss:// or unix://")
        return self
