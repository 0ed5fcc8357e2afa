"""Ray Serve app: deploy rayline's ingress (`serving.ingress`) locally or on a cluster.

`python -m serving.app --config configs/fraud.yaml` (what `make serve` runs) starts Serve on the
config's host/port and keeps it up; `serve run configs/serve.yaml` / `serve deploy` go through
`app_builder`. Request logs are JSON lines in Ray's log files, never on the console.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from ray import serve

from jobs.config import Config, load_config
from jobs.errors import ConfigError
from jobs.online import records_table
from serving.ingress import build_app
from serving.schema import record_model
from serving.slots import RegistryLoader

__all__ = ["app_builder", "build_app", "deploy", "record_model", "records_table"]
LOGGING = {"log_level": "INFO", "encoding": "JSON", "enable_access_log": False}


def app_builder(args: dict):
    """Entry point for `serve run serving.app:app_builder config=configs/fraud.yaml`.

    `serve run`/`serve deploy` listen on the Serve config's host, which this cannot see, so the
    local-demo switch that turns auth off is refused here."""
    config = load_config(args["config"])
    if config.serve.auth.local_demo_no_auth:
        raise ConfigError(
            "serve.auth.local_demo_no_auth is for `make serve`/the demo only, not `serve run` "
            "or `serve deploy` (their host comes from the Serve config)"
        )
    return build_app(config)


def deploy(config: Config, loader: RegistryLoader | None = None, wait_s: float = 120.0) -> str:
    """Starts Serve on the configured host/port and deploys; returns the base URL."""
    from jobs.ray_runtime import init_ray

    app = build_app(config, loader)  # checks tokens and aliases first: fails before Ray
    init_ray(config)
    serve.start(
        http_options={
            "host": config.serve.host,
            "port": config.serve.port,
            "request_timeout_s": config.serve.request_timeout_s,
        },
        logging_config=LOGGING,
    )
    serve.run(app, name="rayline", route_prefix="/", blocking=False, logging_config=LOGGING)
    url = f"http://{config.serve.host}:{config.serve.port}"
    deadline = time.monotonic() + wait_s
    import requests

    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"Serve app did not answer {url}/readyz within {wait_s:.0f} s")


def main(
    config: Annotated[str, typer.Option(help="Pipeline config YAML (its serve: section)")],
    port: Annotated[int, typer.Option(help="HTTP port (0: the config's serve.port)")] = 0,
) -> None:
    """Serve the configured models until interrupted (what `make serve` runs)."""
    loaded = load_config(config, {"serve.port": port} if port else {})
    url = deploy(loaded)
    typer.echo(
        f"serving on {url} (POST /predict, GET /models, /healthz, /readyz, docs at /docs); "
        "Ctrl-C stops"
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        import ray

        from jobs.ray_runtime import joins_cluster

        if joins_cluster():
            serve.shutdown()  # a cluster outlives this driver: take the app off it
        ray.shutdown()  # an embedded Ray goes down whole (serve.shutdown could wait on it)


if __name__ == "__main__":
    from jobs.entrypoint import run_cli

    run_cli(main)
