"""`ray job submit` of the pipeline to a real `ray start --head` cluster with token auth on.

The cluster is this test's own: its ports are free ones picked here, its temp dir is private,
its token lives in a temp file (never ~/.ray), and it is stopped by signalling the blocking
`ray start` process that owns it, never with `ray stop`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from jobs.registry import get_alias, list_versions, load_bundle
from jobs.storage import Storage, join
from tests.conftest import ROOT, free_port, make_config, pids_mentioning

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180


def _home_token_state() -> str | None:
    path = Path.home() / ".ray" / "auth_token"
    if not path.exists():
        return None
    return f"{path.stat().st_mtime_ns}:{hashlib.sha256(path.read_bytes()).hexdigest()}"


class Cluster:
    def __init__(self, temp_dir: Path, token: str, env: dict, dashboard_port: int, process):
        self.temp_dir, self.token, self.env = temp_dir, token, env
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        self.process = process


@pytest.fixture(scope="module")
def cluster():
    """A private Ray head with the dashboard and token authentication; yields a Cluster."""
    home_token = _home_token_state()
    temp_dir = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_path = temp_dir / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    ports = {
        "--port": free_port(),
        "--dashboard-port": free_port(),
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    # Workers get a private range below the ephemeral ports and above Ray's default range.
    first_worker_port = random.randrange(20_000, 29_000, 100)
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
        "--temp-dir", str(temp_dir), "--num-cpus", "2", "--disable-usage-stats",
        "--min-worker-port", str(first_worker_port),
        "--max-worker-port", str(first_worker_port + 99),
    ]  # fmt: skip
    for flag, port in ports.items():
        command += [flag, str(port)]
    log = (temp_dir / "ray-start.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               cwd=temp_dir)  # fmt: skip
    try:
        yield Cluster(temp_dir, token, env, ports["--dashboard-port"], process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()
        time.sleep(2)  # children exit after their parent
        leftovers = pids_mentioning(str(temp_dir))
        for pid in leftovers:  # only processes of this cluster: their command names our dir
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output = (temp_dir / "ray-start.log").read_text(errors="replace")
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert _home_token_state() == home_token, "~/.ray/auth_token must not be touched"
        assert not leftovers, f"processes outlived `ray start --block`: {leftovers}\n{output}"


def wait_for_dashboard(cluster: Cluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    headers = {"Authorization": f"Bearer {cluster.token}"}
    while time.monotonic() < deadline:
        if cluster.process.poll() is not None:
            log = (cluster.temp_dir / "ray-start.log").read_text(errors="replace")
            pytest.fail(f"ray start exited with {cluster.process.returncode}:\n{log}")
        try:
            response = requests.get(f"{cluster.dashboard}/api/version", headers=headers, timeout=5)
            if response.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    log = (cluster.temp_dir / "ray-start.log").read_text(errors="replace")
    pytest.fail(f"dashboard did not answer within {START_TIMEOUT_S} s:\n{log}")


def test_dashboard_requires_the_token(cluster):
    wait_for_dashboard(cluster)
    url = f"{cluster.dashboard}/api/version"
    good = requests.get(url, headers={"Authorization": f"Bearer {cluster.token}"}, timeout=10)
    assert good.status_code == 200
    assert "ray_version" in good.json()
    assert requests.get(url, timeout=10).status_code == 401
    wrong = {"Authorization": f"Bearer {secrets.token_hex(32)}"}
    assert requests.get(url, headers=wrong, timeout=10).status_code == 403


def test_pipeline_runs_under_ray_job_submit(cluster, sample_data, tmp_path):
    """The README's command as written: the repo is uploaded without data/ (gitignored), and
    `--root "$PWD"` points the job back at the checkout's data/ and artifacts/."""
    wait_for_dashboard(cluster)
    checkout = tmp_path / "checkout"  # stands in for the user's clone after `make demo`
    (checkout / "data").mkdir(parents=True)
    (checkout / "data" / "fraud").symlink_to(sample_data, target_is_directory=True)
    config = make_config(sample_data, checkout / "artifacts" / "fraud")
    storage_uri = checkout / "artifacts" / "fraud"
    excludes = ["data/", "artifacts/", ".venv/", "*.parquet"]

    command = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard,
        "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": excludes}),
        "--", "python", "-m", "jobs.pipeline", "--config", "configs/fraud.yaml",
        "--root", str(checkout),
    ]  # fmt: skip
    submitted = subprocess.run(command, env=cluster.env, capture_output=True, text=True,
                               timeout=540, cwd=checkout)  # fmt: skip
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output
    assert "succeeded" in output, output

    storage = Storage(config.s3)
    registry_uri = join(str(storage_uri), "registry")
    assert list_versions(storage, registry_uri, config.name) == [1]
    assert get_alias(storage, registry_uri, config.name, "production")["version"] == 1
    bundle = load_bundle(storage, registry_uri, config.name)
    assert bundle.lineage["training"]["plan"] == "distributed"  # as configs/fraud.yaml says
    assert bundle.metrics["roc_auc"] > 0.7  # generated data with known signal

    # The same submission without the token is refused before anything runs.
    no_token = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    no_token["HOME"] = str(tmp_path / "home")  # no ~/.ray/auth_token to fall back on
    refused = subprocess.run(command, env=no_token, capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)  # fmt: skip
    assert refused.returncode != 0
    assert "Missing authentication token" in refused.stdout + refused.stderr
    assert list_versions(storage, registry_uri, config.name) == [1]
