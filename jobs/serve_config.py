"""The `serve:` section of a pipeline config: models and rollout, limits, auth, monitoring.

Kept apart from jobs.config so the pipeline config stays readable; jobs.config re-exports it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class CanaryConfig(Strict):
    ref: str = Field(description="alias or version of the candidate, e.g. candidate or 7")
    weight: float = Field(0.0, ge=0, le=1, description="share of requests it answers")


class ServedModelConfig(Strict):
    name: str = Field("", description="registered model name; defaults to the config's name")
    alias: str = Field("production", description="replicas follow this alias when it moves")
    canary: CanaryConfig | None = None
    shadow: str | None = Field(None, description="alias/version also scored; only logged")


class AuthConfig(Strict):
    """Bearer tokens with scopes. Tokens never live in the config: only where to read them."""

    tokens_env: str = Field("RAYLINE_SERVE_TOKENS", description="'scopes:token' entries")
    tokens_file: str | None = Field(None, description="a secret file with the same entries")
    local_demo_no_auth: bool = Field(
        False, description="no auth at all; refused unless host is loopback"
    )


class AutoscalingConfig(Strict):
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(32, gt=0)


class MonitoringConfig(Strict):
    drift_window: int = Field(2000, ge=50, description="recent records PSI is computed over")
    sample_rate: float = Field(0.01, ge=0, le=1, description="requests written to storage")
    sample_uri: str = Field("", description="default: <storage>/serving/samples")


class ServeConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models: list[ServedModelConfig] = Field(
        default_factory=lambda: [ServedModelConfig()],
        min_length=1,
        description="the first is the default model of POST /predict",
    )
    max_batch_size: int = Field(
        64, ge=1, description="records per model call (a larger request is split into several)"
    )
    batch_wait_timeout_s: float = Field(0.002, ge=0)
    max_records_per_request: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024, description="413 above this")
    request_timeout_s: float = Field(30.0, gt=0, description="the proxy answers 408 after this")
    max_ongoing_requests: int = Field(64, ge=1, description="per replica, in flight")
    max_queued_requests: int = Field(
        64, ge=-1, description="queued beyond that, then 503 with Retry-After (-1: no cap)"
    )
    replica_cpus: float = Field(1.0, gt=0, description="CPUs reserved per Serve replica")
    replica_resources: dict[str, float] = Field(
        default_factory=dict, description="custom resources, e.g. {on_demand: 0.01}"
    )
    replica_labels: dict[str, str] = Field(
        default_factory=dict, description="label_selector, e.g. {ray.io/market-type: on-demand}"
    )
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    refresh_s: float = Field(5.0, gt=0, description="how often replicas re-read aliases")
    online_state: bool = Field(
        False,
        description="history and window features from the online state in Redis "
        "(`stream.redis_url`) instead of the bundle's snapshot",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)

    @model_validator(mode="after")
    def _coherent(self) -> ServeConfig:
        if self.autoscaling.min_replicas > self.autoscaling.max_replicas:
            raise ValueError("serve.autoscaling: min_replicas is greater than max_replicas")
        if self.auth.local_demo_no_auth and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(
                f"serve.auth.local_demo_no_auth is only allowed on loopback, not host {self.host!r}"
            )
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"serve.models: a model is listed twice ({names})")
        return self


def check_online_state(config, error: type[Exception] = ValueError) -> None:
    """`serve.online_state` reads the state the stream side writes: it needs `stream:`."""
    if config.serve.online_state and config.stream is None:
        raise error(
            "serve.online_state: the online feature state lives in Redis; add a `stream:` "
            "section (its redis_url and prefix name the state to read)"
        )
