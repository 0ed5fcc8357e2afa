"""The spot watcher against a loopback server that plays the AWS and GCP metadata endpoints,
and end to end against a private two-node Ray cluster whose spot worker it drains."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from jobs import spot_watcher
from jobs.errors import ConfigError
from jobs.spot_watcher import AwsPoller, GcpPoller, MetadataError, watch
from tests.conftest import ROOT, free_port, pids_mentioning

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90


class Metadata:
    """What the fake metadata server answers; tests flip these fields."""

    def __init__(self) -> None:
        self.notice: str | None = None  # raw body of spot/instance-action once there is one
        self.rebalance: str | None = None
        self.rebalance_delay_s = 0.0  # a rebalance endpoint that hangs
        self.preempted, self.token_puts, self.lock = False, 0, threading.Lock()
        self.tokens: set[str] = set()
        self.gcp_queries: list[str] = []

    def aws_notice(self, seconds_ahead: float, action: str = "terminate") -> None:
        when = datetime.now(UTC) + timedelta(seconds=seconds_ahead)
        self.notice = json.dumps({"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")})


def _handler(state: Metadata) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            return

        def _send(self, status: int, body: str = "", etag: str = "") -> None:
            data = body.encode()
            self.send_response(status)
            if etag:
                self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            if self.path != "/latest/api/token":
                return self._send(404)
            if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return self._send(400, "missing TTL header")
            with state.lock:
                state.token_puts += 1
                token = f"token-{state.token_puts}"
                state.tokens.add(token)
            self._send(200, token)

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/computeMetadata/v1/instance/preempted":
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self._send(403, "Missing Metadata-Flavor:Google header")
                state.gcp_queries.append(self.path)
                return self._send(200, "TRUE" if state.preempted else "FALSE", etag="e1")
            if not path.startswith("/latest/meta-data/"):
                return self._send(404)
            if self.headers.get("X-aws-ec2-metadata-token") not in state.tokens:
                return self._send(401)
            if path == "/latest/meta-data/spot/instance-action" and state.notice is not None:
                return self._send(200, state.notice)
            if path.endswith("/events/recommendations/rebalance") and state.rebalance_delay_s:
                time.sleep(state.rebalance_delay_s)
            if path.endswith("/events/recommendations/rebalance") and state.rebalance:
                return self._send(200, state.rebalance)
            self._send(404, "Not Found")

    return Handler


@pytest.fixture
def metadata():
    """A metadata server on a free loopback port: yields (state, base URL)."""
    state = Metadata()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_aws_none_until_notice_then_deadline(metadata):
    state, base = metadata
    poller = AwsPoller(base)
    assert poller.poll() is None
    assert poller.poll() is None
    assert state.token_puts == 1  # one token for many GETs
    state.aws_notice(20)
    assert 15 <= poller.poll() <= 20
    assert "terminate" in poller.describe()
    state.aws_notice(-30)  # clock skew: the time already passed
    assert poller.poll() == 0.0
    state.aws_notice(3600, action="stop")  # capped at AWS's two minutes
    assert poller.poll() == spot_watcher.AWS_MAX_NOTICE_S


def test_aws_refreshes_the_token_on_401_and_before_its_ttl(metadata):
    state, base = metadata
    poller = AwsPoller(base)
    assert poller.poll() is None
    state.tokens.clear()  # the metadata service forgot every token
    state.aws_notice(20)
    assert poller.poll() is not None
    assert state.token_puts == 2
    poller.token_expires = time.monotonic() + 30  # within a minute of its TTL
    poller.poll()
    assert state.token_puts == 3


def test_aws_rebalance_is_logged_once_not_drained(metadata, caplog):
    state, base = metadata
    state.rebalance = '{"noticeTime": "2026-11-22T21:00:00Z"}'
    poller = AwsPoller(base)
    with caplog.at_level(logging.WARNING, logger="rayline.spot_watcher"):
        assert poller.poll() is None
        assert poller.poll() is None
    assert sum("rebalance" in r.message for r in caplog.records) == 1


def test_aws_slow_rebalance_endpoint_never_hides_the_notice(metadata):
    state, base = metadata
    state.rebalance_delay_s = spot_watcher.HTTP_TIMEOUT_S + 1
    poller = AwsPoller(base)
    assert poller.poll() is None  # no notice yet; the hanging hint is only logged
    state.aws_notice(60)
    assert 50 < poller.poll() <= 60


def test_aws_bad_json_is_one_clear_error(metadata):
    state, base = metadata
    state.notice = "<html>oops</html>"
    with pytest.raises(MetadataError, match="not JSON with 'action' and 'time'"):
        AwsPoller(base).poll()


def test_gcp_none_until_preempted_then_the_notice(metadata):
    state, base = metadata
    url = f"{base}/computeMetadata/v1/instance/preempted"
    assert requests.get(url, timeout=5).status_code == 403  # the server insists on the header
    poller = GcpPoller(base, notice_s=30, wait_s=1)
    assert poller.poll() is None
    state.preempted = True
    assert 29 <= poller.poll() <= 30
    # The first query reads the value; later ones hang on it past the ETag it came with.
    assert "wait_for_change" not in state.gcp_queries[0]
    assert "wait_for_change=true&last_etag=e1" in state.gcp_queries[1]


def test_unreachable_metadata_keeps_the_watcher_polling(caplog):
    base = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    polls = []
    poller = AwsPoller(base)
    poll = poller.poll
    poller.poll = lambda: polls.append(1) or poll()  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="rayline.spot_watcher"):
        assert watch(poller, "127.0.0.1:1", "ab" * 28, interval_s=0.05, max_polls=4) is False
    assert len(polls) == 4  # it kept polling, and said so once
    lines = [r.message for r in caplog.records if r.message.startswith("metadata:")]
    assert lines == [f"metadata: {base} unreachable (ConnectionError)"]


def test_drains_once_and_retries_a_failed_drain(metadata, monkeypatch):
    state, base = metadata
    calls: list[tuple[str, str, float]] = []
    answers = iter([(False, "GCS busy"), (True, "")])

    def fake_drain(address: str, node_id: str, message: str, seconds_left: float):
        calls.append((node_id, message, seconds_left))
        return next(answers)

    monkeypatch.setattr(spot_watcher, "drain", fake_drain)
    state.aws_notice(60)
    assert watch(AwsPoller(base), "127.0.0.1:1", "ab" * 28, interval_s=0.05, max_polls=5)
    assert len(calls) == 2 and calls[1][0] == "ab" * 28 and 50 < calls[1][2] <= 60


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--cloud", "azure"], "azure"),
        (["--cloud", "aws", "--interval-s", "0", "--address", "x:1"], "--interval-s"),
        (["--cloud", "aws", "--interval-s", "nan", "--address", "x:1"], "--interval-s"),
        (["--cloud", "gcp", "--gcp-notice-s", "inf", "--address", "x:1"], "--gcp-notice-s"),
        (["--cloud", "aws", "--node-id", "abcd", "--address", "x:1"], "--node-id"),
    ],
)
def test_bad_arguments_are_one_line(args, expected):
    result = subprocess.run(
        [sys.executable, "-m", "jobs.spot_watcher", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("config", ["aws-spot.yaml", "gcp-spot.yaml"])
def test_cluster_configs_start_the_watcher_on_spot_types_only(config, tmp_path):
    """Runs worker_start_ray_commands[1:] as Ray would (labels exported as RAY_OVERRIDE_LABELS)
    with a `python3` that only records its arguments."""
    import yaml
    from ray.autoscaler._private.command_runner import _with_environment_variables

    doc = yaml.safe_load((ROOT / "cluster" / config).read_text())
    (tmp_path / "python3").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/started\n')
    (tmp_path / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "RAY_HEAD_IP": "10.0.0.1"}
    for name, node_type in doc["available_node_types"].items():
        if name == doc["head_node_type"]:
            continue
        (tmp_path / "started").unlink(missing_ok=True)
        for command in doc["worker_start_ray_commands"][2:]:  # after `ray stop`, `ray start`
            command = command.replace("/tmp/", f"{tmp_path}/")
            labels = {"RAY_OVERRIDE_LABELS": node_type["labels"]}
            subprocess.run(["bash", "-c", _with_environment_variables(command, labels)],
                           env=env, check=True, timeout=30)  # fmt: skip
        spot = node_type["labels"]["ray.io/market-type"] == "spot"
        started = ""
        # The watcher starts in the background: wait for the whole line (the file exists as
        # soon as `echo >>` opens it, before the line is in it), up to 30 s on a busy machine.
        for _ in range(300 if spot else 3):
            if (tmp_path / "started").exists():
                started = (tmp_path / "started").read_text()
                if started.endswith("\n"):
                    break
            time.sleep(0.1)
        assert (tmp_path / "started").exists() == spot, name
        cloud = doc["provider"]["type"]
        assert not spot or f"--cloud {cloud} --address=10.0.0.1:6379" in started, started


# ---------------------------------------------------------------- a real Ray cluster


def _node_ports(first: int) -> list[str]:
    """Free ports for every per-node flag, and a private worker port range from `first`."""
    ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
             "--object-manager-port"]  # fmt: skip
    flags = ["--min-worker-port", str(first), "--max-worker-port", str(first + 99)]
    for flag in ports:
        flags += [flag, str(free_port())]
    return flags


def _nodes(address: str) -> dict:
    from ray._raylet import GcsClient

    return {k.hex(): v for k, v in GcsClient(address=address).get_all_node_info().items()}


def _wait_for(what: str, check, timeout: float, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            found = check()
            if found:
                return found
        time.sleep(0.3)
    tails = "\n".join(f"{p.name}: {p.read_text(errors='replace')[-1500:]}" for p in logs)
    pytest.fail(f"{what} not within {timeout} s\n{tails}")


@pytest.fixture
def two_nodes():
    """A private head (0 CPUs) and one spot-labelled worker: (address, temp dir, env, logs)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rl-spot-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    first = random.randrange(20_000, 29_000, 200)  # below ephemeral ports, above Ray's defaults
    head = [str(VENV_BIN / "ray"), "start", "--head", "--port", str(port), "--num-cpus", "0",
            "--include-dashboard", "false", "--dashboard-port", str(free_port()),
            "--ray-client-server-port", str(free_port()), *common, *_node_ports(first)]  # fmt: skip
    worker = [str(VENV_BIN / "ray"), "start", "--address", address, "--num-cpus=1",
              "--labels=ray.io/market-type=spot", *common, *_node_ports(first + 100)]  # fmt: skip
    processes: list[subprocess.Popen] = []
    logs = [temp_dir / "head.log", temp_dir / "worker.log"]
    try:
        for command, log in zip((head, worker), logs, strict=True):
            with log.open("w") as out:
                opts = {"stdout": out, "stderr": subprocess.STDOUT, "cwd": temp_dir, "env": env}
                processes.append(subprocess.Popen(command, **opts))
            if command is head:
                _wait_for("the head", lambda: _nodes(address), START_TIMEOUT_S, logs)
        yield address, temp_dir, env, logs
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        time.sleep(1)
        for pid in pids_mentioning(str(temp_dir)):  # only this cluster's: they name our dir
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


BUSY = """
import os, sys, time, ray
ray.init(address=sys.argv[1])
@ray.remote(num_cpus=1, label_selector={"ray.io/market-type": "spot"})
def busy(flag):
    while not os.path.exists(flag):
        time.sleep(0.2)
ray.get(busy.remote(sys.argv[2]))
"""


@pytest.mark.slow
def test_notice_drains_the_spot_worker_in_ray(metadata, two_nodes):
    from ray.core.generated import common_pb2, gcs_pb2

    state, base = metadata
    address, temp_dir, env, logs = two_nodes
    worker_id = _wait_for(
        "the spot worker",
        lambda: next(i for i, n in _nodes(address).items()
                     if n.labels.get("ray.io/market-type") == "spot" and n.state == 0),
        START_TIMEOUT_S, logs,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="pass --node-id"):  # two nodes share 127's IP
        spot_watcher.local_node_id(address)

    # A task holds the worker's CPU, so the drained node stays alive and DRAINING until it ends.
    flag = temp_dir / "done"
    driver_log = temp_dir / "driver.log"
    logs.append(driver_log)
    with driver_log.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-c", BUSY, address, str(flag)], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, cwd=temp_dir)  # fmt: skip
    watcher_log = temp_dir / "watcher.log"
    logs.append(watcher_log)
    with watcher_log.open("w") as out:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "jobs.spot_watcher", "--cloud", "aws", "--metadata-url", base,
             "--node-id", worker_id, "--address", address, "--interval-s", "0.5"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    try:
        snapshot = gcs_pb2.NodeSnapshot
        _wait_for("a busy worker",
                  lambda: _nodes(address)[worker_id].state_snapshot.state == snapshot.ACTIVE,
                  START_TIMEOUT_S, logs)  # fmt: skip
        assert watcher.poll() is None, watcher_log.read_text()  # no notice: still polling
        state.aws_notice(20)
        _wait_for("DRAINING",
                  lambda: _nodes(address)[worker_id].state_snapshot.state == snapshot.DRAINING,
                  15, logs)  # fmt: skip
        assert watcher.wait(timeout=15) == 0  # one drain per notice, then it exits
        assert "drained node" in watcher_log.read_text()

        flag.touch()  # the task ends; the drained worker goes away with the preemption reason
        dead = _wait_for(
            "the drained worker's death",
            lambda: (n := _nodes(address)[worker_id]).state == 1 and n,
            30,
            logs,
        )
        assert common_pb2.NodeDeathInfo.Reason.Name(dead.death_info.reason) == (
            "AUTOSCALER_DRAIN_PREEMPTED"
        )
        assert "AWS spot interruption: terminate" in dead.death_info.reason_message
    finally:
        for process in (watcher, driver):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
