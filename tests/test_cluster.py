"""`ray up` cluster configs: the shipped ones validate clean, broken copies give one error each
naming the file and key path, the CLI exits 2 with one line per problem, prices are sourced.
Fast and offline: Ray's prepare_config/validate_config call no cloud (checked with sockets off).
"""

from __future__ import annotations

import copy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.cluster import PRICES, load_prices, validate
from jobs.cost import estimate
from jobs.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [ROOT / "cluster" / "aws-spot.yaml", ROOT / "cluster" / "gcp-spot.yaml"]


def _write(tmp_path: Path, name: str, config: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: validation must stay offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"validation tried to connect: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_clean(path, no_network):
    assert validate(path) == []


def _aws(c):
    return c["available_node_types"]


def _break_typo(c):
    _aws(c)["cpu_spot_m6i"]["min_worker"] = _aws(c)["cpu_spot_m6i"].pop("min_workers")
    return "available_node_types.cpu_spot_m6i.min_worker", "unknown key"


def _break_min_max(c):
    _aws(c)["cpu_spot_m6i"].update(min_workers=5, max_workers=2)
    return (
        "available_node_types.cpu_spot_m6i.min_workers (5) > max_workers (2)",
        "raise max_workers",
    )


def _break_price(c):
    _aws(c)["cpu_spot_m5"]["node_config"]["InstanceType"] = "m7i.48xlarge"
    _aws(c)["cpu_spot_m5"]["labels"]["rayline.io/instance-type"] = "m7i.48xlarge"
    return "available_node_types.cpu_spot_m5.node_config.InstanceType (m7i.48xlarge)", "no price"


def _break_float_cpu(c):
    _aws(c)["cpu_spot_c6i"]["resources"]["CPU"] = 7.5
    return "available_node_types.cpu_spot_c6i.resources.CPU (7.5)", "whole number"


def _break_label(c):
    del _aws(c)["gpu_spot_g5"]["labels"]["ray.io/market-type"]
    return "available_node_types.gpu_spot_g5.labels.ray.io/market-type", "spot or on-demand"


def _break_instance_label(c):
    _aws(c)["cpu_spot_c6i"]["labels"]["rayline.io/instance-type"] = "c6i.xlarge"
    return (
        "available_node_types.cpu_spot_c6i.labels.rayline.io/instance-type ('c6i.xlarge')",
        "set it to c6i.2xlarge",
    )


def _break_head_cpu(c):
    _aws(c)["head_on_demand"]["resources"]["CPU"] = 4
    return "available_node_types.head_on_demand.resources.CPU (4)", "CPU: 0"


def _break_omitted_commands(c):
    del c["worker_setup_commands"]
    return "worker_setup_commands not set", "set it explicitly"


def _break_unpinned(c):
    c["setup_commands"][1] = 'python3 -m pip install "ray[default]" -e ~/rayline'
    return "setup_commands[1] installs 'ray[default]', not pinned", "ray[default]==2.60.0"


def _break_nightly(c):
    c["setup_commands"] = [
        'which ray || pip install -U "ray[default] @ https://s3-us-west-2.amazonaws.com/'
        'ray-wheels/latest/ray-3.0.0.dev0-cp310-cp310-manylinux2014_x86_64.whl"',
        'python3 -m pip install "ray[default]==2.60.0" -e ~/rayline',
    ]
    return "setup_commands[0] installs a Ray nightly wheel", "ray==2.60.0"


def _break_node_setup(c):
    _aws(c)["gpu_spot_g5"]["worker_setup_commands"] = ["nvidia-smi"]
    return "available_node_types.gpu_spot_g5.worker_setup_commands replaces", "ray==2.60.0"


def _break_market(c):
    del _aws(c)["cpu_spot_m5"]["node_config"]["InstanceMarketOptions"]
    return "available_node_types.cpu_spot_m5.node_config.InstanceMarketOptions", "labelled spot"


def _break_global_max(c):
    c["max_workers"] = 0
    _aws(c)["cpu_on_demand_m6i"].update(min_workers=1, max_workers=1)
    return "max_workers (0) < sum of min_workers (1)", "raise max_workers"


def _break_top_level_typo(c):
    c["idle_timout_minutes"] = 3  # only Ray's schema knows the top-level keys
    return "(top level) Ray's schema", "idle_timout_minutes"


BREAKS = [
    _break_typo,
    _break_min_max,
    _break_price,
    _break_float_cpu,
    _break_label,
    _break_instance_label,
    _break_head_cpu,
    _break_omitted_commands,
    _break_unpinned,
    _break_nightly,
    _break_node_setup,
    _break_market,
    _break_global_max,
    _break_top_level_typo,
]


@pytest.mark.parametrize("breaker", BREAKS, ids=lambda f: f.__name__.removeprefix("_break_"))
def test_broken_aws_copy_gives_exactly_one_error(tmp_path, breaker, no_network):
    config = yaml.safe_load(CONFIGS[0].read_text())
    where, fix = breaker(config)
    path = _write(tmp_path, "aws-broken.yaml", config)
    errors = validate(path)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}: {where}"), errors[0]
    assert fix in errors[0], errors[0]


def test_gcp_scheduling_as_list_is_one_error(tmp_path, no_network):
    config = yaml.safe_load(CONFIGS[1].read_text())
    config["available_node_types"]["cpu_spot_n2"]["node_config"]["scheduling"] = [
        {"preemptible": True}
    ]
    errors = validate(_write(tmp_path, "gcp-broken.yaml", config))
    assert len(errors) == 1, errors
    assert "available_node_types.cpu_spot_n2.node_config.scheduling is a list" in errors[0]


def test_gcp_missing_price_names_machine_type(tmp_path):
    config = yaml.safe_load(CONFIGS[1].read_text())
    config["available_node_types"]["cpu_spot_c2"]["node_config"]["machineType"] = "c3-standard-8"
    config["available_node_types"]["cpu_spot_c2"]["labels"]["rayline.io/instance-type"] = (
        "c3-standard-8"
    )
    errors = validate(_write(tmp_path, "gcp-broken.yaml", config))
    assert errors == [
        f"{tmp_path / 'gcp-broken.yaml'}: available_node_types.cpu_spot_c2.node_config."
        f"machineType (c3-standard-8) has no price in {PRICES}: add it under gcp: "
        "with on_demand, spot, region, date and source"
    ]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_validates_shipped_configs():
    done = _cli("cluster", "validate", *map(str, CONFIGS))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok:")


def test_cli_sends_kuberay_manifests_to_jobs_kuberay():
    manifests = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))
    if not manifests:
        pytest.skip("no KubeRay manifests in this checkout")
    from jobs.kuberay import CRD_DIR

    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not at {CRD_DIR}")
    done = _cli("cluster", "validate", *map(str, manifests), *map(str, CONFIGS))
    assert done.returncode == 0, done.stderr


def test_cli_exits_2_with_one_line_per_problem(tmp_path):
    config = yaml.safe_load(CONFIGS[0].read_text())
    broken = copy.deepcopy(config)
    _break_min_max(broken)
    _break_price(broken)
    _break_label(broken)
    path = _write(tmp_path, "aws-broken.yaml", broken)
    done = _cli("cluster", "validate", str(path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 3, done.stderr
    assert all(line.startswith(f"error: {path}: available_node_types.") for line in lines)


def test_cli_missing_file_is_one_line():
    done = _cli("cluster", "validate", "cluster/no-such.yaml")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: cluster/no-such.yaml: cannot read: No such file or directory"
    ]


def test_prices_cover_both_configs_with_date_and_source():
    prices = yaml.safe_load(PRICES.read_text())
    for cloud in ("aws", "gcp"):
        assert prices[cloud], cloud
        for instance, entry in prices[cloud].items():
            assert entry["date"] and entry["source"], instance
            assert entry["region"] and entry["approximate"] is True, instance
            assert 0 < entry["spot"] < entry["on_demand"], instance


def test_cost_estimate(tmp_path):
    rows = {r["node_type"]: r for r in estimate(CONFIGS[0], workers=4, hours=10)}
    prices = yaml.safe_load(PRICES.read_text())["aws"]
    head = prices["m6i.xlarge"]["on_demand"]
    always_on = prices["m6i.2xlarge"]["on_demand"]  # cpu_on_demand_m6i has min_workers: 1
    spot = rows["cpu_spot_m6i"]
    assert spot["hourly"] == pytest.approx(head + always_on + 4 * prices["m6i.2xlarge"]["spot"])
    assert spot["total"] == pytest.approx(10 * spot["hourly"])
    assert spot["on_demand_hourly"] == pytest.approx(
        head + always_on + 4 * prices["m6i.2xlarge"]["on_demand"]
    )
    assert "cpu_on_demand_m6i" not in rows  # its max_workers is 2
    assert {r["node_type"]: r for r in estimate(CONFIGS[0], 2, 1)}["cpu_on_demand_m6i"][
        "saving"
    ] == 0
    assert "cpu_on_demand_m6i" not in {
        r["node_type"] for r in estimate(CONFIGS[0], workers=3, hours=1)
    }  # max_workers: 2
    with pytest.raises(ConfigError, match="more than the cluster's max_workers"):
        estimate(CONFIGS[0], workers=13, hours=1)
    with pytest.raises(ConfigError, match="finite"):
        estimate(CONFIGS[0], workers=1, hours=float("inf"))
    done = _cli("cost", "estimate", str(CONFIGS[1]), "--workers", "2", "--hours", "3")
    assert done.returncode == 0, done.stderr
    assert "gpu_spot_g2" in done.stdout and "saving" in done.stdout


HOSTILE = {
    "binary.yaml": b"\xff\xfe\x00garbage",
    "provider-string.yaml": b"provider: aws\n",
    "node-type-null.yaml": b"max_workers: 1\nprovider: {type: aws}\n"
    b"available_node_types: {a: null}\n",
    "nan-cpu.yaml": b"provider: {type: aws}\navailable_node_types:\n  a:\n"
    b"    node_config: {InstanceType: [m5.2xlarge]}\n    resources: {CPU: .nan, GPU: .inf}\n"
    b"    min_workers: -3\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_files_get_one_line_errors_not_tracebacks(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(HOSTILE[name])
    done = _cli("cluster", "validate", str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert all(line.startswith("error: ") for line in done.stderr.strip().splitlines())
    assert str(path) in done.stderr


def test_a_broken_price_entry_is_named(tmp_path):
    prices = yaml.safe_load(PRICES.read_text())
    del prices["aws"]["m5.2xlarge"]["spot"]
    prices["gcp"]["n2-standard-8"]["on_demand"] = "0.39$"
    path = tmp_path / "prices.yaml"
    path.write_text(yaml.safe_dump(prices))
    with pytest.raises(ConfigError) as raised:
        load_prices(path)
    lines = str(raised.value).splitlines()
    assert len(lines) == 2, lines
    assert "aws.m5.2xlarge.spot (None) must be a price" in lines[0]
    assert "gcp.n2-standard-8.on_demand ('0.39$')" in lines[1]
