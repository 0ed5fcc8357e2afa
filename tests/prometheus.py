"""Test helpers: a real Prometheus server and a private Ray head that exports metrics quickly.

Both are context managers; tests/conftest.py wraps them as the module-scoped fixtures
`metrics_head` (own temp dir, ports and auth token) and `prometheus` (scraping it, with
configs/alerts.yml loaded).

A driver runs in a subprocess (`head.run_python(code)`, env and address set), since the test
process may already hold the session's embedded Ray. An end-to-end test of the real app does
the same: deploy it from a driver (`serve.run(...)` or `serve run --address head.address ...`
with `head.env`, HTTP on a free port), send requests, then `prom.wait_for('sum(...)', ...)`.

Why a private head: metrics reach Prometheus through the per-node metrics agent on
`--metrics-export-port` (`ray.nodes()[i]["MetricsExportPort"]` on any cluster), and only what
is set when a node starts (`RAY_metrics_report_interval_ms`, default 10 s; Ray floors it at
1 s) makes workers report quickly. `RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0` stops a SIGTERMed
`ray start --block` from draining for 30 s. Everything is stopped by PID, never `ray stop`.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from tests.conftest import ROOT, free_port, pids_mentioning, wait_for_port

VENV_BIN = Path(sys.executable).parent
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


@dataclass
class Prometheus:
    url: str
    folder: Path
    process: subprocess.Popen

    def query(self, expr: str) -> list[dict]:
        """Instant query; the `result` list of /api/v1/query (each: metric labels, value)."""
        response = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        response.raise_for_status()
        return response.json()["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The value of a query that yields one series (e.g. a `sum(...)`), else None."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def wait_for(
        self, expr: str, check: Callable[[list[dict]], bool], timeout: float = 30.0
    ) -> list[dict]:
        """Polls a query until `check(result)` holds; fails naming the query and last result."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if check(result):
                return result
            time.sleep(0.5)
        raise AssertionError(f"{expr!r} did not satisfy the check in {timeout} s: {result}")

    def targets_up(self) -> list[dict]:
        response = requests.get(f"{self.url}/api/v1/targets", timeout=10)
        return response.json()["data"]["activeTargets"]


@contextlib.contextmanager
def prometheus_server(
    targets: Sequence[str],
    folder: Path,
    scrape_interval_s: float = 1.0,
    rule_files: Sequence[Path] = (),
) -> Iterator[Prometheus]:
    """Runs /usr/bin/prometheus scraping `targets` (host:port) on a free loopback port, with
    its TSDB and config in `folder`; stops it by PID."""
    if PROMETHEUS is None:
        raise RuntimeError("no prometheus binary on PATH (apt-get install prometheus)")
    interval = f"{int(scrape_interval_s * 1000)}ms"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(Path(path).resolve()) for path in rule_files],
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": list(targets)}]}],
    }
    config_path = folder / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (folder / "prometheus.log").open("w")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={folder / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=folder,
    )  # fmt: skip
    server = Prometheus(f"http://127.0.0.1:{port}", folder, process)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited: {(folder / 'prometheus.log').read_text()[-2000:]}"
                )
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError("prometheus was not ready within 30 s")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


@dataclass
class RayHead:
    address: str  # GCS address, for ray.init(address=...) and `serve run --address`
    metrics_port: int
    env: dict  # token auth, quick reporting; pass to every driver subprocess
    temp_dir: Path
    process: subprocess.Popen
    log: Path = field(default=Path())

    @property
    def metrics_target(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def run_python(
        self, code: str, timeout: float = 120, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        """Runs `code` in a fresh interpreter (cwd: the repo) with RAYLINE_RAY_ADDRESS set."""
        env = {**self.env, "RAYLINE_RAY_ADDRESS": self.address, **(env or {})}
        return subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip


@contextlib.contextmanager
def ray_head_with_metrics(num_cpus: int = 2, report_interval_ms: int = 1000) -> Iterator[RayHead]:
    """A private `ray start --head --block` (no dashboard) with its own temp dir, free ports,
    token and a fixed metrics export port; its workers report metrics every
    `report_interval_ms`. Stopped by signalling the blocking process, leftovers by PID."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))  # short: socket paths
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_metrics_report_interval_ms=str(report_interval_ms),
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    ports = {
        flag: free_port()
        for flag in (
            "--port", "--metrics-export-port", "--ray-client-server-port",
            "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port",
        )
    }  # fmt: skip
    first_worker_port = random.randrange(20_000, 29_000, 100)
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--include-dashboard", "false",
        "--temp-dir", str(temp_dir), "--num-cpus", str(num_cpus), "--disable-usage-stats",
        "--min-worker-port", str(first_worker_port),
        "--max-worker-port", str(first_worker_port + 99),
    ]  # fmt: skip
    for flag, port in ports.items():
        command += [flag, str(port)]
    log_path = temp_dir / "ray-start.log"
    log = log_path.open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               cwd=temp_dir)  # fmt: skip
    head = RayHead(
        f"127.0.0.1:{ports['--port']}", ports["--metrics-export-port"], env, temp_dir, process,
        log_path,
    )  # fmt: skip
    try:
        wait_for_port(head.metrics_port, timeout=120)
        yield head
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()
        time.sleep(1)  # children exit after their parent
        for pid in pids_mentioning(str(temp_dir)):  # only this head's processes
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
