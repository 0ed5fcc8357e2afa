"""`rayline cluster validate FILE`: checks for `ray up` YAMLs (and KubeRay manifests).

`validate(path)` runs Ray's own offline checks (`prepare_config`, which fills the provider
defaults from the YAML shipped inside Ray, and `validate_config`, the JSON schema plus a few
cross-field rules; neither calls a cloud API) and then rayline's own checks where Ray's schema
accepts anything or where its defaults would do harm:

- every `available_node_types` entry uses only known keys, and its `node_config` only known
  AWS `RunInstances` / GCP `instances.insert` keys;
- every instance type (AWS `InstanceType`, GCP `machineType`) has a price in cluster/prices.yaml;
- CPU/GPU resources are integers, per-type `min_workers <= max_workers`, the sum of
  `min_workers` is at most the global `max_workers`;
- every type carries `ray.io/market-type: spot|on-demand`, matching how it is launched, and
  `rayline.io/instance-type` naming its instance type (the run cost report prices by it);
- the head advertises `CPU: 0`;
- every command list (and the other keys Ray's defaults would fill) is set explicitly, and
  every `pip install` of Ray pins `==2.60.0` (Ray's defaults install a nightly wheel).

Each problem is one line naming the file, the key path and the fix.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from jobs.prices import PRICES, load_prices, load_yaml, one_line_yaml  # noqa: F401

RAY_VERSION = "2.60.0"
MARKET_LABEL = "ray.io/market-type"
INSTANCE_LABEL = "rayline.io/instance-type"  # what a run's cost report prices the node as
MARKETS = ("spot", "on-demand")

# Keys Ray's provider defaults would otherwise fill by a shallow merge.
EXPLICIT_KEYS = (
    "max_workers",
    "idle_timeout_minutes",
    "file_mounts",
    "cluster_synced_files",
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
NODE_TYPE_KEYS = {
    "node_config",
    "resources",
    "labels",
    "min_workers",
    "max_workers",
    "idle_timeout_s",
    "priority",
    "initialization_commands",
    "worker_setup_commands",
    "docker",
}
# EC2 RunInstances parameters (plus Ray's own SubnetIds/SecurityGroupIds lists).
AWS_NODE_CONFIG_KEYS = {
    "InstanceType", "ImageId", "KeyName", "SubnetId", "SubnetIds", "SecurityGroupIds",
    "SecurityGroups", "BlockDeviceMappings", "InstanceMarketOptions", "IamInstanceProfile",
    "TagSpecifications", "UserData", "Placement", "NetworkInterfaces", "MetadataOptions",
    "EbsOptimized", "Monitoring", "CapacityReservationSpecification", "LaunchTemplate",
    "CpuOptions", "HibernationOptions", "PrivateDnsNameOptions",
    "InstanceInitiatedShutdownBehavior",
    "DisableApiTermination", "KernelId", "RamdiskId", "ElasticGpuSpecification",
    "ElasticInferenceAccelerators", "EnclaveOptions", "LicenseSpecifications",
    "MaintenanceOptions", "CreditSpecification", "Ipv6AddressCount", "Ipv6Addresses",
    "PrivateIpAddress", "DisableApiStop", "EnablePrimaryIpv6", "InstanceRequirements",
}  # fmt: skip
# Compute Engine instances.insert fields (plus Ray's TPU keys).
GCP_NODE_CONFIG_KEYS = {
    "machineType", "disks", "scheduling", "guestAccelerators", "labels", "metadata",
    "networkInterfaces", "serviceAccounts", "tags", "minCpuPlatform", "shieldedInstanceConfig",
    "reservationAffinity", "advancedMachineFeatures", "confidentialInstanceConfig",
    "displayDevice", "resourcePolicies", "description", "canIpForward", "deletionProtection",
    "hostname", "networkPerformanceConfig", "resourceManagerTags", "params", "sourceMachineImage",
    "acceleratorType", "acceleratorConfig", "runtimeVersion", "networkConfig", "serviceAccount",
    "schedulingConfig",
}  # fmt: skip
INSTANCE_KEY = {"aws": "InstanceType", "gcp": "machineType"}
NODE_CONFIG_KEYS = {"aws": AWS_NODE_CONFIG_KEYS, "gcp": GCP_NODE_CONFIG_KEYS}
PIP_RAY = re.compile(r"^ray(\[[^\]]*\])?(.*)$")


def _key_path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def ray_checks(config: dict[str, Any]) -> list[tuple[str, str]]:
    """Ray's own `prepare_config` + `validate_config` (offline): (key path, problem) pairs."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    # Its defaults narrate ("setting max workers for head node type to 0") on stderr.
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as error:
        where = _key_path(error.absolute_path) or "(top level)"
        return [(where, f"Ray's schema: {error.message}")]
    except NotImplementedError as error:
        return [("provider.type", f"Ray: {error}")]
    except KeyError as error:
        return [(str(error.args[0]), f"Ray: required key {error.args[0]!r} is missing: add it")]
    except (ValueError, AssertionError, RuntimeError) as error:
        message = str(error)
        where = "max_workers" if "max_workers" in message else "head_node_type"
        return [(where, f"Ray: {message}")]
    except Exception as error:  # noqa: BLE001 - e.g. `provider: aws` (not a mapping)
        return [("(top level)", f"Ray cannot read it ({type(error).__name__}: {error})")]
    return []


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pin_problems(key: str, commands: Any) -> tuple[list[tuple[str, str]], bool]:
    """Problems with Ray installs in one command list, and whether it installs ray==2.60.0."""
    problems, pinned = [], False
    if not isinstance(commands, list):
        return problems, pinned
    for i, command in enumerate(commands):
        if not isinstance(command, str):
            continue
        if "ray-wheels" in command or "dev0" in command:
            problems.append(
                (f"{key}[{i}]", f"installs a Ray nightly wheel: install ray=={RAY_VERSION}")
            )
            continue
        if "pip install" not in command:
            continue
        try:
            tokens = shlex.split(command)
        except ValueError:
            tokens = command.split()
        for token in tokens:
            found = PIP_RAY.match(token)
            if not found:
                continue
            spec = found.group(2).strip()
            if spec == f"=={RAY_VERSION}":
                pinned = True
            elif spec == "" or spec[0] in "=<>~!@":
                problems.append(
                    (
                        f"{key}[{i}]",
                        f"installs {token!r}, not pinned: "
                        f'use "ray{found.group(1) or ""}=={RAY_VERSION}"',
                    )
                )
    return problems, pinned


def rayline_checks(
    config: dict[str, Any], prices: dict[str, Any], prices_path: str | Path = PRICES
) -> list[tuple[str, str]]:
    """rayline's own checks, where Ray's schema accepts anything: (key path, problem) pairs."""
    problems: list[tuple[str, str]] = []
    provider = config.get("provider") if isinstance(config.get("provider"), dict) else {}
    cloud = provider.get("type")
    if cloud not in INSTANCE_KEY:
        problems.append(
            ("provider.type", f"({cloud!r}) rayline checks aws and gcp configs: use aws or gcp")
        )
    for key in EXPLICIT_KEYS:
        if key not in config:
            problems.append(
                (key, "not set: set it explicitly (else Ray fills it from its provider defaults)")
            )
    if cloud == "aws" and provider.get("cache_stopped_nodes") is not False:
        problems.append(
            ("provider.cache_stopped_nodes", "must be false: stopped spot nodes save nothing")
        )

    pinned = False
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "initialization_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):  # fmt: skip
        found, ok = _pin_problems(key, config.get(key))
        problems += found
        pinned = pinned or (ok and key == "setup_commands")

    types = config.get("available_node_types")
    if not isinstance(types, dict):
        return problems
    head = config.get("head_node_type")
    priced = prices.get(cloud) or {} if cloud else {}
    for name, spec in types.items():
        where = f"available_node_types.{name}"
        if not isinstance(spec, dict):
            problems.append((where, f"({spec!r}) must be a mapping with node_config, resources"))
            continue
        for key in sorted(set(spec) - NODE_TYPE_KEYS):
            problems.append(
                (f"{where}.{key}", f"unknown key: use one of {', '.join(sorted(NODE_TYPE_KEYS))}")
            )
        node_config = spec.get("node_config") if isinstance(spec.get("node_config"), dict) else {}
        if cloud in NODE_CONFIG_KEYS:
            for key in sorted(set(node_config) - NODE_CONFIG_KEYS[cloud]):
                problems.append(
                    (
                        f"{where}.node_config.{key}",
                        f"unknown {cloud} node_config key: check the spelling",
                    )
                )
            key = INSTANCE_KEY[cloud]
            instance = node_config.get(key)
            if instance is None:
                problems.append(
                    (f"{where}.node_config.{key}", f"missing: set the {cloud} instance type")
                )
            elif not isinstance(instance, str):
                problems.append((f"{where}.node_config.{key}", f"({instance!r}) must be a name"))
            elif instance not in priced:
                problems.append(
                    (
                        f"{where}.node_config.{key}",
                        f"({instance}) has no price in {prices_path}: add it under {cloud}: "
                        "with on_demand, spot, region, date and source",
                    )
                )
        for key in ("initialization_commands", "worker_setup_commands"):
            found, ok = _pin_problems(f"{where}.{key}", spec.get(key))
            problems += found
            if key == "worker_setup_commands" and key in spec and not ok and not found:
                problems.append(
                    (
                        f"{where}.{key}",
                        "replaces setup_commands for this type but installs no "
                        f"ray=={RAY_VERSION}: add python3 -m pip install "
                        f'"ray[default]=={RAY_VERSION}"',
                    )
                )
        resources = spec.get("resources") if isinstance(spec.get("resources"), dict) else {}
        for key, value in resources.items():
            if key in ("CPU", "GPU") and not (_is_int(value) and value >= 0):
                finite = isinstance(value, float) and math.isfinite(value)
                whole = max(int(value), 0) if finite else 1
                problems.append(
                    (
                        f"{where}.resources.{key}",
                        f"({value!r}) must be a whole number >= 0, e.g. {whole}",
                    )
                )
        low, high = spec.get("min_workers", 0), spec.get("max_workers")
        if _is_int(low) and low < 0:
            problems.append((f"{where}.min_workers", f"({low}) must be 0 or more"))
        if _is_int(low) and _is_int(high) and low > high:
            problems.append(
                (
                    f"{where}.min_workers",
                    f"({low}) > max_workers ({high}): lower min_workers or raise max_workers",
                )
            )
        labels = spec.get("labels") if isinstance(spec.get("labels"), dict) else {}
        market = labels.get(MARKET_LABEL)
        if market not in MARKETS:
            problems.append(
                (
                    f"{where}.labels.{MARKET_LABEL}",
                    f"({market!r}) must be spot or on-demand: add labels: {{{MARKET_LABEL}: spot}} "
                    "or on-demand",
                )
            )
        elif cloud in INSTANCE_KEY:
            problems += _market_problems(cloud, where, market, node_config)
        instance = node_config.get(INSTANCE_KEY.get(cloud, ""))
        if (
            cloud in INSTANCE_KEY
            and isinstance(instance, str)
            and labels.get(INSTANCE_LABEL) != instance
        ):
            problems.append(
                (f"{where}.labels.{INSTANCE_LABEL}", f"({labels.get(INSTANCE_LABEL)!r}) must "
                 f"name the instance type for the run cost report: set it to {instance}")
            )  # fmt: skip
        if name == head and resources.get("CPU") != 0:
            problems.append(
                (
                    f"{where}.resources.CPU",
                    f"({resources.get('CPU')!r}) the head must run no training: "
                    "set resources: {CPU: 0}",
                )
            )
    total_min = sum(
        s.get("min_workers", 0)
        for s in types.values()
        if isinstance(s, dict) and _is_int(s.get("min_workers", 0))
    )
    if _is_int(config.get("max_workers")) and total_min > config["max_workers"]:
        problems.append(
            (
                "max_workers",
                f"({config['max_workers']}) < sum of min_workers ({total_min}): "
                "raise max_workers or lower min_workers",
            )
        )
    pin_reported = any(where.split("[")[0].endswith("setup_commands") for where, _ in problems)
    if "setup_commands" in config and not pinned and not pin_reported:
        problems.append(
            ("setup_commands", f"no command installs ray=={RAY_VERSION}: add "
             f"python3 -m pip install \"ray[default]=={RAY_VERSION}\"")
        )  # fmt: skip
    return problems


def _market_problems(cloud: str, where: str, market: str, node_config: dict) -> list:
    if cloud == "aws":
        options = node_config.get("InstanceMarketOptions") or {}
        spot = isinstance(options, dict) and options.get("MarketType") == "spot"
        fix = "InstanceMarketOptions: {MarketType: spot}"
        key = "InstanceMarketOptions"
    else:
        scheduling = node_config.get("scheduling")
        if isinstance(scheduling, list):
            return [
                (
                    f"{where}.node_config.scheduling",
                    "is a list; the Compute API wants an object: "
                    "{provisioningModel: SPOT, instanceTerminationAction: DELETE}",
                )
            ]
        spot = isinstance(scheduling, dict) and scheduling.get("provisioningModel") == "SPOT"
        fix = "scheduling: {provisioningModel: SPOT, instanceTerminationAction: DELETE}"
        key = "scheduling"
    if market == "spot" and not spot:
        return [(f"{where}.node_config.{key}", f"labelled spot but launched on-demand: set {fix}")]
    if market == "on-demand" and spot:
        return [
            (
                f"{where}.node_config.{key}",
                f"labelled on-demand but launched as spot: remove {key} or label it spot",
            )
        ]
    return []


def _covered(path: str, paths: list[str]) -> bool:
    return any(p == path or p.startswith(path + ".") or path.startswith(p + ".") for p in paths)


def validate(path: str | Path, prices_path: str | Path = PRICES) -> list[str]:
    """Every problem with a `ray up` YAML, one line each (`FILE: KEY.PATH ...: fix`)."""
    config = load_yaml(path)
    if not isinstance(config, dict):
        return [f"{path}: expected a mapping (a `ray up` cluster config)"]
    ours = rayline_checks(config, load_prices(prices_path), prices_path)
    paths = [where for where, _ in ours]
    theirs = [(w, m) for w, m in ray_checks(config) if not _covered(w, paths)]
    return [f"{path}: {where} {message}" for where, message in ours + theirs]


def _is_kubernetes(path: str | Path) -> bool:
    try:
        docs = list(yaml.safe_load_all(Path(path).read_text()))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    first = next((d for d in docs if d is not None), None)
    return len(docs) > 1 or (isinstance(first, dict) and "kind" in first)


def validate_any(path: str | Path) -> list[str]:
    """A KubeRay manifest (a `kind:` at the top) goes to jobs.kuberay, the rest are `ray up`."""
    if _is_kubernetes(path):
        from jobs.kuberay import validate_manifest

        return validate_manifest(path)
    return validate(path)


app = typer.Typer(help="Cluster configs for `ray up` and KubeRay manifests.", no_args_is_help=True)


@app.command("validate")
def validate_command(
    files: Annotated[list[Path], typer.Argument(help="`ray up` YAMLs or KubeRay manifests")],
) -> None:
    """Check `ray up` YAMLs (Ray's own schema plus rayline's rules) and KubeRay manifests
    (jobs.kuberay); one `error:` line per problem and exit 2 if there are any."""
    problems = [problem for file in files for problem in validate_any(file)]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        raise typer.Exit(2)
    typer.echo(f"ok: {', '.join(str(f) for f in files)}")
