"""Ray's own autoscaler on one machine: cluster/local/fake-multinode.yaml with the fake_multinode
provider (each "node" is a real raylet the provider starts and joins to the head's GCS).

A head with 0 CPUs and no workers; a driver asks for CPU on spot-labelled capacity
(`label_selector={"ray.io/market-type": "spot"}`): autoscaler v2 launches `spot_cpu` nodes from
zero, the tasks run there, and the idle nodes go after `idle_timeout_minutes`. Then one task asks
for on-demand capacity and only an `on_demand_cpu` node is launched -- the control showing the
choice follows the label selector, not the node types' names (autoscaler v1, the 2.60 default,
ignores label selectors and breaks the tie between the two 1-CPU types by name, which happens to
pick `spot_cpu`; asked for on-demand it launches spot nodes first).

The cluster is this test's own: free ports for every port flag, a private worker port range, a
private temp dir, its own token file; the fake nodes bind OS-assigned ports (the provider starts
them with every port 0) and live under the same temp dir, so every process the test leaves behind
names that dir and is killed by PID. Never `ray stop`.
"""

from __future__ import annotations

import contextlib
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
import yaml

from tests.conftest import ROOT, free_port, pids_mentioning, wait_for_port

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
CONFIG = ROOT / "cluster" / "local" / "fake-multinode.yaml"
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # what RAY_FAKE_CLUSTER=1 `ray start --head` uses
MARKET = "ray.io/market-type"
START_TIMEOUT_S = 60
SCALE_DOWN_SLACK_S = 45  # on top of idle_timeout_minutes; one autoscaler pass is ~1 s here

# Runs in its own process against the head: prints one JSON document with what it saw.
DRIVER = r"""
import json, sys, time
import ray

address, idle_s, slack_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, log_to_driver=False)
t0 = time.monotonic()


def workers():
    return {n["NodeID"]: {"alive": n["Alive"], "labels": n.get("Labels", {}),
                          "cpu": n.get("Resources", {}).get("CPU", 0)}
            for n in ray.nodes() if n["NodeID"] != sys.argv[4]}


def wait_all_dead(timeout):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not any(w["alive"] for w in workers().values()):
            return time.monotonic() - start
        time.sleep(0.5)
    return None


@ray.remote(num_cpus=1)
def where(seconds):
    time.sleep(seconds)
    ctx = ray.get_runtime_context()
    return {"node": ctx.get_node_id(), "labels": ctx.get_node_labels()}


out = {"workers_at_start": workers()}

spot = where.options(label_selector={"ray.io/market-type": "spot"})
started = time.monotonic()
out["spot_results"] = ray.get([spot.remote(3) for _ in range(2)], timeout=90)
out["spot_tasks_s"] = time.monotonic() - started
out["workers_after_spot"] = workers()
out["spot_scale_down_s"] = wait_all_dead(idle_s + slack_s)
out["workers_after_spot_down"] = workers()

on_demand = where.options(label_selector={"ray.io/market-type": "on-demand"})
started = time.monotonic()
out["on_demand_result"] = ray.get(on_demand.remote(0), timeout=90)
out["on_demand_task_s"] = time.monotonic() - started
out["workers_after_on_demand"] = workers()
out["on_demand_scale_down_s"] = wait_all_dead(idle_s + slack_s)
out["workers_at_end"] = workers()
out["driver_s"] = time.monotonic() - t0
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.fixture
def fake_cluster():
    """A RAY_FAKE_CLUSTER=1 head (0 CPUs, autoscaler v2) running our config; yields
    (gcs address, env, temp dir, config as written, head process)."""
    from ray._private.services import get_node_ip_address

    temp_dir = Path(tempfile.mkdtemp(prefix="rl-as-", dir="/tmp"))
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)

    gcs_port = free_port()
    # The fake nodes join the GCS at provider.gcs_address (default <ip>:6379): point it at ours.
    gcs_address = f"{get_node_ip_address()}:{gcs_port}"
    config = yaml.safe_load(CONFIG.read_text())
    config["provider"]["gcs_address"] = gcs_address
    config_path = temp_dir / "autoscaler.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        RAY_FAKE_CLUSTER="1",  # FakeMultiNodeProvider refuses to start without it
        RAY_enable_autoscaler_v2="1",  # v1 ignores label selectors
        RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,  # v2 matches the head's instance by this id
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        AUTOSCALER_METRIC_PORT=str(free_port()),  # default 44217 is shared by every cluster here
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    ports = {
        "--port": gcs_port,
        "--dashboard-port": free_port(),
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    first_worker_port = random.randrange(20_000, 29_000, 100)
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "0",
        "--autoscaling-config", str(config_path), "--include-dashboard", "false",
        "--temp-dir", str(temp_dir), "--disable-usage-stats",
        "--min-worker-port", str(first_worker_port),
        "--max-worker-port", str(first_worker_port + 99),
    ]  # fmt: skip
    for flag, port in ports.items():
        command += [flag, str(port)]
    log = (temp_dir / "ray-start.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               cwd=temp_dir)  # fmt: skip
    try:
        wait_for_port(gcs_port, timeout=START_TIMEOUT_S)
        yield gcs_address, env, temp_dir, config, process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()
        time.sleep(2)  # children exit after their parent
        # A fake node still up when the head stops outlives it: the provider starts its raylet
        # and log monitor from the autoscaler process without a reaper, so `ray start` does not
        # stop them. Their command lines name our temp dir: kill those by PID, then check.
        leftovers = pids_mentioning(str(temp_dir))
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(1)
        survivors = pids_mentioning(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
        if leftovers:
            print(f"killed {len(leftovers)} leftover process(es) of this cluster: {leftovers}")
        assert not survivors, f"processes of this cluster survived SIGKILL: {survivors}"


def test_spot_label_scales_spot_workers_from_zero_and_idle_ones_down(fake_cluster):
    gcs_address, env, temp_dir, config, head = fake_cluster
    idle_s = config["idle_timeout_minutes"] * 60
    spot_type = config["available_node_types"]["spot_cpu"]

    started = time.monotonic()
    driver = subprocess.run(
        [sys.executable, "-c", DRIVER, gcs_address, str(idle_s), str(SCALE_DOWN_SLACK_S),
         FAKE_HEAD_NODE_ID],
        env=env, cwd=temp_dir, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    lines = [line for line in driver.stdout.splitlines() if line.startswith("RESULT ")]
    monitor = temp_dir / "session_latest" / "logs" / "monitor.log"
    context = (
        f"driver rc={driver.returncode} after {elapsed:.0f} s\n{driver.stdout[-2000:]}\n"
        f"{driver.stderr[-4000:]}\nmonitor.log:\n"
        + (monitor.read_text(errors="replace")[-4000:] if monitor.exists() else "(none)")
    )
    assert head.poll() is None, f"the head exited ({head.returncode})\n{context}"
    assert driver.returncode == 0 and lines, context
    out = json.loads(lines[-1].removeprefix("RESULT "))
    timings = {k: round(v, 1) for k, v in out.items() if k.endswith("_s") and v is not None}
    print(f"spot nodes used: {len({r['node'] for r in out['spot_results']})}; timings: {timings}")

    # From zero: the head has no CPU and there is no worker node.
    assert out["workers_at_start"] == {}, context

    # Spot demand launched spot nodes only (at most the type's max_workers), labelled spot by the
    # provider from the node type's `labels`, and every spot task ran on one of them.
    after_spot = out["workers_after_spot"]
    assert after_spot, context
    assert 1 <= len(after_spot) <= spot_type["max_workers"], context
    for node_id, node in after_spot.items():
        assert node["labels"].get(MARKET) == "spot", (node_id, node, context)
        assert node["cpu"] == spot_type["resources"]["CPU"], (node_id, node, context)
    for result in out["spot_results"]:
        assert result["node"] in after_spot, (result, context)
        assert result["labels"].get(MARKET) == "spot", (result, context)

    # Idle spot nodes are removed within the idle timeout plus slack.
    assert out["spot_scale_down_s"] is not None, f"spot nodes still up\n{context}"
    assert out["spot_scale_down_s"] <= idle_s + SCALE_DOWN_SLACK_S, context

    # Every node launched so far was spot (none came up late as another type).
    before = out["workers_after_spot_down"]
    assert all(w["labels"].get(MARKET) == "spot" for w in before.values()), context

    # Control: on-demand demand launches exactly one new node, on-demand, and no spot node.
    new = {k: v for k, v in out["workers_after_on_demand"].items() if k not in before}
    assert len(new) == 1, (new, context)
    ((node_id, node),) = new.items()
    assert node["labels"].get(MARKET) == "on-demand", (node, context)
    assert out["on_demand_result"]["node"] == node_id, context
    assert out["on_demand_scale_down_s"] is not None, f"on-demand node still up\n{context}"
    assert not any(w["alive"] for w in out["workers_at_end"].values()), context
