"""Shared fixtures: one local Ray for the session, sample data, a moto S3 server on loopback.

Tests never attach to a cluster they did not start: Ray runs embedded (`address="local"`,
2 CPUs, no dashboard) and every server a test needs is started here with free ports.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Fake credentials for the local S3 server; set before Ray starts so its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAYLINE_PII_KEY", "test-pii-key")
# Serving tests authenticate with these (the app refuses to start without tokens).
PREDICT_TOKEN = "predict-token-for-tests"
ADMIN_TOKEN = "admin-token-for-tests"
os.environ["RAYLINE_SERVE_TOKENS"] = f"predict:{PREDICT_TOKEN} admin,predict:{ADMIN_TOKEN}"
PREDICT_HEADERS = {"Authorization": f"Bearer {PREDICT_TOKEN}"}
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _session_auth_token() -> None:
    """Token auth stays on (Ray 2.60's default) with a token of our own, so ~/.ray is untouched."""
    import secrets
    import tempfile

    if "RAY_AUTH_TOKEN_PATH" in os.environ or "RAY_AUTH_TOKEN" in os.environ:
        return
    folder = tempfile.mkdtemp(prefix="rayline-auth-")
    path = Path(folder, "auth_token")
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    os.environ.setdefault("RAY_AUTH_MODE", "token")


_session_auth_token()

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ROWS = 20_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from jobs.ray_runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    from jobs.data import generate

    folder = tmp_path_factory.mktemp("data")
    generate(str(folder), rows=SAMPLE_ROWS, days=10, seed=11)
    return folder


def make_config(data: Path | str, storage: Path | str, **overrides):
    """configs/fraud.yaml pointed at `data` and `storage`, small enough for tests."""
    from jobs.config import load_config

    values = {
        "storage": str(storage),
        "sources.transactions.uri": f"{data}/transactions",
        "sources.customers.uri": f"{data}/customers",
        "sources.merchants.uri": f"{data}/merchants",
        "train.plan": "single",
        "train.num_boost_round": 120,
        "train.checkpoint_every": 20,
    }
    values.update(overrides)
    return load_config(ROOT / "configs" / "fraud.yaml", values)


@pytest.fixture(scope="session")
def pipeline_run(ray_session, sample_data, tmp_path_factory):
    """One full pipeline run on the sample data, shared by registry, predict and serving tests."""
    from jobs.pipeline import run_pipeline

    config = make_config(sample_data, tmp_path_factory.mktemp("artifacts"))
    return config, run_pipeline(config, quiet=True)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback (real HTTP); yields its endpoint URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; yields (endpoint_url, bucket name)."""
    import uuid

    import pyarrow.fs as pafs

    name = f"rayline-{uuid.uuid4().hex[:8]}"
    host = s3_server.removeprefix("http://")
    fs = pafs.S3FileSystem(
        endpoint_override=host, scheme="http", region="us-east-1", allow_bucket_creation=True
    )
    fs.create_dir(name)
    return s3_server, name


@pytest.fixture(scope="module")
def metrics_head():
    """A private Ray head whose workers report metrics every second (tests/prometheus.py)."""
    from tests.prometheus import ray_head_with_metrics

    with ray_head_with_metrics() as head:
        yield head


@pytest.fixture(scope="module")
def prometheus(metrics_head, tmp_path_factory):
    """A real Prometheus scraping `metrics_head`, with configs/alerts.yml loaded."""
    from tests.prometheus import PROMETHEUS, prometheus_server

    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    folder = tmp_path_factory.mktemp("prometheus")
    rules = [ROOT / "configs" / "alerts.yml"]
    with prometheus_server([metrics_head.metrics_target], folder, rule_files=rules) as server:
        yield server


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line mentions `text` (a private temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server (Debian's) on a free loopback port, stopped by its PID."""
    from tests.redis_server import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path / "redis", free_port()).start()
    try:
        yield server
    finally:
        server.stop()
