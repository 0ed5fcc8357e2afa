"""`make demo`: sample data -> the whole batch pipeline -> Ray Serve -> a real HTTP prediction.

Everything runs on one embedded local Ray, started once, and is shut down at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Annotated

import redis
import requests
import typer
from ray import serve

from jobs.config import load_config
from jobs.data import generate
from jobs.feedback import feedback_pairs, live_quality
from jobs.pipeline import run_pipeline
from jobs.ray_runtime import joins_cluster
from jobs.replay import replay
from jobs.storage import Storage, join
from jobs.stream import bootstrap_state, run_stream
from jobs.stream_keys import StreamKeys
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
    result = run_pipeline(loaded)
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
        console.rule("stream: the test split arrives as live transactions")
        stream_demo(loaded, result.run_uri, config)
    finally:
        if joins_cluster():
            serve.shutdown()  # a cluster outlives this driver: take the demo app off it
        # An embedded Ray goes down whole with ray.shutdown(). serve.shutdown() first would only
        # add a raylet warning: the controller kills itself while its graceful_shutdown call is
        # still pending, and Ray reports that call as failed.
        ray.shutdown()
    console.rule("done: data, runs and the registry are under " + loaded.storage)


@contextmanager
def local_redis():
    """A private redis-server on a free loopback port for the demo, stopped by its PID."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="rayline-redis-")
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", folder,
               "--save", "", "--appendonly", "no", "--logfile", f"{folder}/redis.log"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def stream_demo(config, run_uri: str, config_path: str, events: int = 300) -> None:
    """Bootstraps the online state with everything before the test split, replays a few
    hundred test-split transactions (labels half a second later) and streams them."""
    if config.stream is None or shutil.which("redis-server") is None:
        reason = "no `stream:` section" if config.stream is None else "redis-server is missing"
        console.print(f"stream: skipped ({reason}; apt-get install redis-server)")
        return
    with local_redis() as url:
        stream = config.stream.model_copy(update={"redis_url": url})
        config = config.model_copy(update={"stream": stream})
        loaded = bootstrap_state(config, run_uri, exclude_split="test")
        console.print(f"online state: {loaded['events']:,} earlier events applied")
        sender = threading.Thread(
            target=replay,
            args=(config,),
            kwargs={
                "split": "test",
                "run_uri": run_uri,
                "rate": 150.0,
                "limit": events,
                "with_labels": True,
                "label_delay_s": 0.5,
            },  # fmt: skip
        )
        sender.start()
        done = run_stream(config, until_idle=3, config_path=config_path)
        sender.join()
        client, keys = redis.Redis.from_url(url), StreamKeys.of(config)
        latest = client.xrevrange(keys.scores, count=5)
        for _, fields in latest:
            entry = {k.decode(): v.decode() for k, v in fields.items()}
            console.print(
                f"  {entry['key']}  customer {entry['entity']}  score {float(entry['score']):.4f}"
                f"  label {entry['label']}  model v{entry['version']}"
            )
        quality = live_quality(None, None, config.task, pairs=feedback_pairs(client, keys))
        console.print(
            f"streamed {done.scored:,} scored, {done.dead} dead, {done.late} late in "
            f"{done.seconds} s; {quality.get('n', 0)} labels joined, "
            f"{quality.get('positives', 0)} fraud"
        )
        if quality.get("pr_auc") is not None:
            shown = {k: "n/a" if quality[k] is None else f"{quality[k]:.3f}"
                     for k in ("precision", "recall", "pr_auc")}  # fmt: skip
            console.print(
                f"live quality: precision {shown['precision']}, recall {shown['recall']}, "
                f"PR-AUC {shown['pr_auc']}"
            )


if __name__ == "__main__":
    from jobs.entrypoint import run_cli

    run_cli(main)
