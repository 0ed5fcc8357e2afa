"""`make demo`: sample data -> the whole batch pipeline -> Ray Serve -> a real HTTP prediction.

Everything runs on one embedded local Ray, started once, and is shut down at the end.
"""

from __future__ import annotations

import json
from typing import Annotated

import requests
import typer
from ray import serve

from jobs.config import load_config
from jobs.data import generate
from jobs.pipeline import run_pipeline
from jobs.storage import Storage
from jobs.summary import console
from serving.app import deploy

SAMPLE = {
    "transaction_id": "demo-1",
    "customer_id": "42",
    "merchant_id": "M00007",
    "amount": 129.99,
    "currency": "EUR",
    "timestamp": "2026-02-01T03:12:00Z",
    "channel": "web",
}


def main(
    config: Annotated[str, typer.Option(help="Pipeline config YAML")] = "configs/fraud.yaml",
    data: Annotated[str, typer.Option(help="Where the sample data lives")] = "data/fraud",
    rows: Annotated[
        int, typer.Option(help="Transactions to generate if data is missing")
    ] = 100_000,
    port: Annotated[int, typer.Option(help="HTTP port for Serve (0: the config's)")] = 0,
) -> None:
    """Run the whole lifecycle locally and end with a real HTTP prediction."""
    import ray

    overrides = {"serve.port": port} if port else {}
    loaded = load_config(config, overrides)
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
    try:
        url = deploy(loaded)
        console.print(f"Ray Serve is up at {url}; POST /predict with one raw transaction:")
        console.print_json(data={"records": [SAMPLE]})
        response = requests.post(f"{url}/predict", json={"records": [SAMPLE]}, timeout=30)
        console.print(f"HTTP {response.status_code}")
        console.print_json(json.dumps(response.json()))
        response.raise_for_status()
    finally:
        serve.shutdown()
        ray.shutdown()
    console.rule("done: data, runs and the registry are under " + loaded.storage)


if __name__ == "__main__":
    from jobs.entrypoint import run_cli

    run_cli(main)
