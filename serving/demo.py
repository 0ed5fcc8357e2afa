"""`make demo`: sample data -> the whole batch pipeline -> Ray Serve -> a real HTTP prediction.

Everything runs on one embedded local Ray, started once, and is shut down at the end.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Annotated

import requests
import typer
from ray import serve

from jobs.config import load_config
from jobs.data import generate
from jobs.pipeline import run_pipeline
from jobs.ray_runtime import joins_cluster
from jobs.storage import Storage, join
from jobs.summary import console
from serving.app import deploy

DEFAULT_DATA = "data/fraud"  # where configs/fraud.yaml reads its sources
GENERATED = ("transactions", "customers", "merchants")  # the sources `generate` writes

SAMPLE = {
    "transaction_id": "demo-1",
    "customer_id": "42",
    "merchant_id": "M00007",
    "amount": 129.99,
    "currency": "EUR",
    "timestamp": "2026-02-01T03:12:00Z",
    "channel": "web",
}


def demo_token(auth) -> dict:
    """Auth stays on in the demo: with no tokens configured, a one-off token is made for it."""
    if auth.local_demo_no_auth:
        return {}
    token = secrets.token_urlsafe(24)
    existing = os.environ.get(auth.tokens_env, "")
    os.environ[auth.tokens_env] = f"{existing} predict:{token}".strip()
    console.print(f"a one-off predict token for this demo was added to {auth.tokens_env}")
    return {"Authorization": f"Bearer {token}"}


def main(
    config: Annotated[str, typer.Option(help="Pipeline config YAML")] = "configs/fraud.yaml",
    data: Annotated[str, typer.Option(help="Where the sample data lives")] = DEFAULT_DATA,
    rows: Annotated[
        int, typer.Option(help="Transactions to generate if data is missing")
    ] = 100_000,
    port: Annotated[int, typer.Option(help="HTTP port for Serve (0: the config's)")] = 0,
    storage_uri: Annotated[
        str, typer.Option("--storage", help="Override the config's storage URI")
    ] = "",
) -> None:
    """Run the whole lifecycle locally and end with a real HTTP prediction."""
    import ray

    overrides: dict = {"serve.port": port} if port else {}
    if storage_uri:
        overrides["storage"] = storage_uri
    loaded = load_config(config, overrides)
    if data != DEFAULT_DATA:  # the sample sources live under --data, not the config's URIs
        present = [name for name in GENERATED if name in loaded.sources]
        sources = {f"sources.{name}.uri": join(data, name) for name in present}
        loaded = load_config(config, {**overrides, **sources})
    storage = Storage(loaded.s3)
    if not storage.exists(f"{data}/transactions"):
        console.rule("generate sample data")
        made = generate(data, rows=rows, storage=storage)
        console.print(
            f"{made.transactions:,} transactions, {made.customers:,} customers, "
            f"{made.merchants:,} merchants (fraud rate {made.fraud_rate:.2%}) in {data}"
        )
    console.rule("pipeline: ingest -> features -> train -> evaluate -> register")
    run_pipeline(loaded)
    console.rule("serve")
    headers = demo_token(loaded.serve.auth)
    try:
        url = deploy(loaded)
        console.print(f"Ray Serve is up at {url}; POST /predict with one raw transaction:")
        console.print_json(data={"records": [SAMPLE]})
        response = requests.post(
            f"{url}/predict", json={"records": [SAMPLE]}, headers=headers, timeout=30
        )
        console.print(f"HTTP {response.status_code}")
        console.print_json(json.dumps(response.json()))
        response.raise_for_status()
    finally:
        if joins_cluster():
            serve.shutdown()  # a cluster outlives this driver: take the demo app off it
        # An embedded Ray goes down whole with ray.shutdown(). serve.shutdown() first would only
        # add a raylet warning: the controller kills itself while its graceful_shutdown call is
        # still pending, and Ray reports that call as failed.
        ray.shutdown()
    console.rule("done: data, runs and the registry are under " + loaded.storage)


if __name__ == "__main__":
    from jobs.entrypoint import run_cli

    run_cli(main)
