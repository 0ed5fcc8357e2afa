"""Rightsizing: recommendations from hand-built usage summaries priced with the real
cluster/prices.yaml (the savings worked out here by hand), and the usage sampler on a real local
Ray measuring a CPU burn and Ray's reservation."""

from __future__ import annotations

import time

import psutil
import pytest

from jobs.cluster import load_prices
from jobs.rightsizing import recommend, rightsize

GIB = 1024**3
PRICES = load_prices()
AWS, GCP = PRICES["aws"], PRICES["gcp"]


def usage(instance, market="spot", p95=1.0, peak_gib=4.0, nodes=1, seconds=3600.0, **extra):
    """One `by_type` entry as UsageSampler.summary() writes it."""
    return {
        "node_type": "worker",
        "instance": instance,
        "market": market,
        "nodes": nodes,
        "nodes_peak": nodes,
        "samples": int(seconds / 2),
        "seconds": seconds,
        "cpu_busy_p95": p95,
        "memory_peak_bytes": peak_gib * GIB,
        "total_cpu_busy_p95": extra.pop("total_p95", p95 * nodes),
        "total_memory_peak_bytes": extra.pop("total_gib", peak_gib * nodes) * GIB,
        "reserved_cpus_peak": extra.pop("reserved", 1.0),
        **extra,
    }


def summary(*types, seconds=3600.0):
    return {"seconds": seconds, "by_type": list(types)}


def cost(*groups):
    """A cost report's by_type: (instance, market, nodes, node_hours)."""
    return {
        "by_type": [
            {"node_type": "worker", "instance": i, "market": m, "nodes": n, "node_hours": h}
            for i, m, n, h in groups
        ]
    }


def test_an_idle_8_vcpu_spot_node_gets_the_4_vcpu_type_and_its_saving():
    # 1 busy core and 6 GiB of 8 vCPUs / 32 GiB: 1.25 cores and 7.5 GiB with headroom.
    found = recommend(
        summary(usage("m6i.2xlarge", p95=1.0, peak_gib=6.0)),
        cost(("m6i.2xlarge", "spot", 1, 2.0)),
        PRICES,
    )
    assert len(found) == 1
    advice = found[0]
    assert advice["action"] == "smaller_instance"
    assert advice["to_instance"] == "m6i.xlarge"
    assert (advice["to_vcpus"], advice["to_memory_gib"]) == (4, 16)
    # Spot at spot: m6i.2xlarge 0.15 $/h, m6i.xlarge 0.075 $/h.
    assert advice["dollars_per_hour_saved"] == pytest.approx(0.15 - 0.075)
    assert advice["dollars_per_hour_saved"] == pytest.approx(
        AWS["m6i.2xlarge"]["spot"] - AWS["m6i.xlarge"]["spot"]
    )
    assert advice["run_dollars_saved"] == pytest.approx(2.0 * (0.15 - 0.075))  # 2 node-hours


def test_on_demand_nodes_are_priced_at_on_demand():
    found = recommend(summary(usage("m5.2xlarge", market="on-demand")), {}, PRICES)
    assert found[0]["to_instance"] == "m6i.xlarge"
    assert found[0]["dollars_per_hour_saved"] == pytest.approx(0.384 - 0.192)
    assert found[0]["run_dollars_saved"] is None  # no cost report: no run total


def test_a_busy_type_gets_nothing():
    busy_cpu = usage("m6i.2xlarge", p95=6.0, peak_gib=6.0)
    busy_memory = usage("n2-standard-8", p95=1.0, peak_gib=20.0)  # 20 of 32 GiB
    result = rightsize(summary(busy_cpu, busy_memory), {}, PRICES)
    assert result == {"recommendations": [], "reason": "no node type under-used"}


def test_a_gpu_type_is_never_moved_to_a_cpu_only_type():
    idle_gpus = [usage("g5.xlarge", p95=0.2, peak_gib=2.0), usage("g2-standard-8", p95=0.2)]
    for found in (recommend(summary(u), {}, PRICES) for u in idle_gpus):
        gpu_types = {n for c in ("aws", "gcp") for n, e in PRICES[c].items() if e.get("gpus")}
        assert all(advice.get("to_instance", advice["instance"]) in gpu_types for advice in found)
    assert recommend(summary(*idle_gpus), {}, PRICES) == []  # no cheaper GPU type in the file


def test_several_under_used_nodes_of_a_type_become_fewer_workers():
    # 4 n2-standard-8 spot nodes busy 5 cores and 40 GiB together at p95/peak:
    # 6.25 cores -> 1 node, 50 GiB -> 2 nodes of 32 GiB; so 2 workers, 2 fewer at 0.094 $/h.
    many = usage("n2-standard-8", p95=1.5, peak_gib=10.0, nodes=4, total_p95=5.0, total_gib=40.0)
    found = recommend(summary(many), cost(("n2-standard-8", "spot", 4, 8.0)), PRICES)
    assert [(a["action"], a["from_workers"], a["workers"]) for a in found] == [
        ("fewer_workers", 4, 2)
    ]
    assert found[0]["dollars_per_hour_saved"] == pytest.approx(2 * 0.094)
    assert found[0]["dollars_per_hour_saved"] == pytest.approx(2 * GCP["n2-standard-8"]["spot"])
    assert found[0]["run_dollars_saved"] == pytest.approx(8.0 * 0.094 / 2)  # half the node-hours


def test_nothing_to_judge_says_why():
    short = rightsize(summary(usage("m6i.2xlarge", seconds=120.0), seconds=120.0), {}, PRICES)
    assert short == {"recommendations": [], "reason": "run too short to judge: 120 s"}
    local = usage(None, market="unknown")
    unpriced = rightsize(summary(local), {}, PRICES)
    assert unpriced["recommendations"] == [] and "no priced node type" in unpriced["reason"]


def test_every_instance_type_has_its_specs():
    for cloud in ("aws", "gcp"):
        for name, entry in PRICES[cloud].items():
            assert entry["vcpus"] > 0 and entry["memory_gib"] > 0, name
    assert (AWS["g5.xlarge"]["gpus"], GCP["g2-standard-8"]["gpus"]) == (1, 1)


def test_sampler_measures_a_cpu_burn_and_the_reservation(ray_session):
    """A 1-CPU task burning ~4 s: the node's Ray processes show it, and Ray's reservation too.
    The burner reports the CPU it got itself: on a loaded host that can be well under a core."""
    from jobs.usage import UsageSampler

    ray = ray_session

    @ray.remote(num_cpus=1)
    def burn(seconds: float) -> float:
        started, end = time.process_time(), time.time() + seconds
        while time.time() < end:
            pass
        return (time.process_time() - started) / seconds

    sampler = UsageSampler(interval_s=0.5).start()
    try:
        assert sampler.wait_ready(timeout_s=120), "the probe never answered"
        probes = list(sampler.probes.values())
        got = ray.get(burn.remote(4.0))
        time.sleep(1.0)
    finally:
        result = sampler.stop()
    [node] = result["nodes"]
    assert node["reserved_cpus_peak"] == pytest.approx(1.0)
    assert node["ray_cpu_busy_peak"] >= min(0.6, 0.7 * got), (node, got)
    assert node["ray_memory_peak_bytes"] > 0
    assert result["by_type"][0]["samples"] >= 4
    assert result["errors"] == 0
    # Stopping kills the probes: a call fails and their processes go.
    assert probes
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(probes[0].sample.remote(), timeout=60)
    deadline = time.monotonic() + 60
    pids = list(sampler.probe_pids.values())
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.5)
    assert not any(_running(pid) for pid in pids)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


DRIVER = """
import json, sys, time
import ray
from jobs.usage import UsageSampler

ray.init(address=sys.argv[1], log_to_driver=False)
sampler = UsageSampler(interval_s=0.5).start()
print("READY", sampler.wait_ready(timeout_s=180), flush=True)
sys.stdin.readline()  # a node joined: its probe starts lazily, at the next tick
deadline = time.monotonic() + 60
while len(sampler.probes) < 3 and time.monotonic() < deadline:
    time.sleep(0.1)
print("PROBED", sampler.wait_ready(timeout_s=180), len(sampler.probes), flush=True)
dead = sys.stdin.readline().strip()  # that node was killed
deadline = time.monotonic() + 120
while dead in sampler.probes and time.monotonic() < deadline:
    time.sleep(0.5)
print("DROPPED", dead not in sampler.probes, flush=True)
print(json.dumps(sampler.stop()), flush=True)
"""


@pytest.mark.slow
def test_sampler_follows_nodes_that_join_and_die():
    """A real multi-node Ray on loopback: a node that joins gets a probe, a node lost without
    notice has its probe dropped, and the run's driver never sees an error."""
    import json
    import signal
    import subprocess

    from tests.conftest import ROOT
    from tests.multinode import VENV_BIN, LocalCluster

    spot = {"ray.io/market-type": "spot", "rayline.io/instance-type": "m6i.2xlarge"}
    cluster = LocalCluster()
    driver = None
    try:
        cluster.start_head(cpus=0, labels={"ray.io/market-type": "on-demand",
                                           "rayline.io/instance-type": "m6i.xlarge"})  # fmt: skip
        cluster.add_worker("a", 1, spot)
        driver = subprocess.Popen([str(VENV_BIN / "python"), "-c", DRIVER, cluster.address],
                                  env=cluster.env, cwd=ROOT, text=True, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)  # fmt: skip
        assert driver.stdout.readline().split() == ["READY", "True"]
        cluster.add_worker("b", 1, spot)
        driver.stdin.write("joined\n")
        driver.stdin.flush()
        assert driver.stdout.readline().split() == ["PROBED", "True", "3"]
        cluster.stop_node("a", signal.SIGKILL)
        driver.stdin.write(cluster.nodes["a"].node_id + "\n")
        driver.stdin.flush()
        # Ray may print its own (raylet) lines on the driver's stdout first: skip them.
        line = driver.stdout.readline()
        while line and not line.startswith("DROPPED"):
            line = driver.stdout.readline()
        assert line.split() == ["DROPPED", "True"]
        result = json.loads(driver.stdout.readline())
        assert driver.wait(timeout=120) == 0
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        cluster.shutdown()
    types = {(t["instance"], t["market"]): t for t in result["by_type"]}
    workers = types[("m6i.2xlarge", "spot")]
    assert (workers["nodes"], workers["basis"]) == (2, "ray-processes")  # they share this host
    assert types[("m6i.xlarge", "on-demand")]["node_type"] == "head"
    assert len(result["nodes"]) == 3
