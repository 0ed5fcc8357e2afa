"""`rayline serve status`: what a running Serve app is doing, from two sources that never lie
about themselves: Ray Serve's controller (deployments, replicas and their states) and the app's
own `GET /models` (versions, aliases, traffic split, shadow) over HTTP.

It lives in jobs (the CLI's side) and talks to serving only over the network, so jobs never
imports serving. It attaches to the cluster named by --address (or RAY_ADDRESS): the one the
app runs on, which the user points it at.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated

import requests
import typer
from rich.table import Table

from jobs.config import load_config
from jobs.errors import ConfigError, RaylineError
from jobs.summary import console

app = typer.Typer(help="Inspect the running Serve app.", no_args_is_help=True)


def reachable(address: str, timeout_s: float = 3.0) -> None:
    """A GCS address `host:port` that answers, checked before Ray would retry for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--address {address!r} is not host:port (the cluster's GCS address)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        reason = error.strerror or error
        raise RaylineError(f"no Ray cluster answers at {address}: {reason}") from None


def replica_states(address: str, name: str = "rayline") -> list[dict]:
    """Deployments of the app with their status and replica counts, from Serve's controller."""
    import ray
    from ray import serve

    reachable(address)
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except Exception as error:  # noqa: BLE001  e.g. token auth without RAY_AUTH_MODE=token
        raise RaylineError(
            f"cannot join the Ray cluster at {address} ({type(error).__name__}); with token "
            "auth set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH"
        ) from None
    try:
        application = serve.status().applications.get(name)
        if application is None:
            raise RaylineError(f"no Serve application named {name!r} on {address}")
        return [
            {
                "deployment": deployment,
                "status": str(getattr(state.status, "value", state.status)),
                "replicas": {str(k): v for k, v in state.replica_states.items()},
                "message": state.message,
            }
            for deployment, state in application.deployments.items()
        ]
    finally:
        ray.shutdown()


def served_models(url: str, token: str | None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = requests.get(f"{url}/models", headers=headers, timeout=10)
    except requests.RequestException as error:
        raise RaylineError(f"cannot reach {url}/models: {type(error).__name__}") from None
    if response.status_code in (401, 403):
        raise RaylineError(
            f"{url}/models answered {response.status_code}: set RAYLINE_TOKEN to a predict token"
        )
    if response.status_code != 200:
        raise RaylineError(f"{url}/models answered HTTP {response.status_code}")
    return response.json()


@app.command("status")
def status(
    config: Annotated[str, typer.Option(help="Pipeline config YAML (its serve: section)")],
    address: Annotated[
        str, typer.Option(help="Ray cluster of the app (default: RAY_ADDRESS)")
    ] = "",
    url: Annotated[str, typer.Option(help="App URL (default: serve.host:serve.port)")] = "",
) -> None:
    """Deployments, replicas, served versions and the traffic split of the running app."""
    loaded = load_config(config)
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise ConfigError("no cluster to ask: pass --address or set RAY_ADDRESS")
    url = url or f"http://{loaded.serve.host}:{loaded.serve.port}"
    deployments = replica_states(address)
    models = served_models(url, os.environ.get("RAYLINE_TOKEN"))
    table = Table(title=f"Serve app 'rayline' on {address}")
    for column in ("deployment", "status", "replicas"):
        table.add_column(column)
    for row in deployments:
        replicas = ", ".join(f"{n} {state.lower()}" for state, n in row["replicas"].items())
        table.add_row(row["deployment"], row["status"], replicas or "-")
    console.print(table)
    table = Table(title=f"models at {url} (default: {models['default']})")
    for column in ("model", "alias", "version", "traffic", "shadow"):
        table.add_column(column)
    for model in models["models"]:
        traffic = ", ".join(f"v{v} {share:.0%}" for v, share in model["traffic"].items())
        shadow = f"v{model['shadow']}" if model["shadow"] else "-"
        table.add_row(model["name"], model["alias"], str(model["version"]), traffic, shadow)
    console.print(table)
