"""Offline validation of the KubeRay manifests under cluster/kuberay/.

`validate_manifest(path)` returns a list of errors (empty when the file is clean), each naming the
file, the key path (`spec.workerGroupSpecs[0].minReplicas`) and the fix. Two layers:

1. Schema: the object is checked against the `openAPIV3Schema` of the matching CRD in
   ../shared/kuberay-crds/ (found by `kind`). The CRDs do not forbid unknown fields, and the API
   server would silently prune a typo'd key, so every object schema that declares `properties`
   (and neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields`) is made closed.
2. KubeRay's semantic rules, for every group of the cluster spec (RayCluster `spec`, RayJob
   `spec.rayClusterSpec`, RayService `spec.rayClusterConfig`):
   - worker groups: minReplicas <= maxReplicas, and replicas within them; group names unique;
   - no `labels` in `rayStartParams` (Ray node labels go in the group's `labels` field);
   - resources set once. The rule: a group declares its Ray logical resources either in the
     group's `resources` field or in `rayStartParams` (`num-cpus`, `num-gpus`, `memory`,
     `resources`), never both; and a non-zero `num-cpus`/`num-gpus` must equal the Ray
     container's CPU/`nvidia.com/gpu` limit (request if no limit), since KubeRay already derives
     them from the container. `num-cpus: "0"` (a head that runs no tasks) is always allowed.
   - RayService: `serveConfigV2` parses as YAML, each application's `import_path` names a module
     in this repo that defines the attribute, and an `args.config` file exists;
   - RayJob: a `--config FILE` in the entrypoint names a file in this repo.
"""

from __future__ import annotations

import ast
import copy
import difflib
import functools
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = REPO_ROOT.parent / "shared" / "kuberay-crds"
KIND_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
CLUSTER_SPEC_KEY = {
    "RayCluster": None,
    "RayJob": "rayClusterSpec",
    "RayService": "rayClusterConfig",
}
API_VERSION = "ray.io/v1"
RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")

try:  # the CRDs are ~60k lines of YAML: use the C loader where PyYAML has it
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader


def format_path(parts) -> str:
    """`['spec', 'workerGroupSpecs', 0, 'labels', 'ray.io/x']` ->
    `spec.workerGroupSpecs[0].labels["ray.io/x"]`."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f'["{part}"]'
    return out or "(top level)"


def close_schema(schema: Any) -> Any:
    """A copy of `schema` where every object that lists `properties` rejects unknown keys."""
    if isinstance(schema, list):
        return [close_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: close_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") or key in ("anyOf", "allOf", "oneOf"):
            out[key] = close_schema(value)
        else:
            out[key] = value
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


class CRDMissing(Exception):
    pass


@functools.lru_cache(maxsize=8)
def _validator(kind: str, crd_dir: str):
    import jsonschema

    path = Path(crd_dir) / KIND_FILES[kind]
    if not path.is_file():
        raise CRDMissing(
            f"KubeRay CRD for {kind} not found at {path}; the CRDs live in ../shared/kuberay-crds/ "
            f"beside the repository (ray-operator/config/crd/bases/ of ray-project/kuberay)"
        )
    crd = yaml.load(path.read_text(), Loader=_Loader)
    versions = crd["spec"]["versions"]
    version = next((v for v in versions if v["name"] == API_VERSION.split("/")[1]), versions[0])
    schema = close_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def _schema_errors(doc: dict, kind: str, crd_dir: Path) -> list[tuple[str, str]]:
    """(key path, problem; fix) pairs from the CRD schema."""
    found = []
    missing_at: list[tuple[str, str]] = []
    suggested = set()  # (object path, key) a typo'd key was matched to: no "missing" error too
    validator = _validator(kind, str(crd_dir))
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        parts = list(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            known = sorted(err.schema.get("properties", {}))
            for key in sorted(set(err.instance) - set(known)):
                close = difflib.get_close_matches(key, known, n=1)
                if close:
                    suggested.add((format_path(parts), close[0]))
                    fix = f"did you mean `{close[0]}`?"
                else:
                    fix = f"remove it (known: {', '.join(known)})"
                found.append((format_path([*parts, key]), f"unknown field `{key}`; fix: {fix}"))
        elif err.validator == "type":
            want = err.validator_value
            found.append(
                (
                    format_path(parts),
                    f"is {type(err.instance).__name__} {err.instance!r}, the CRD wants {want}; "
                    f"fix: write it as {want}" + (' (quote it: "...")' if want == "string" else ""),
                )
            )
        elif err.validator == "required":
            missing = re.findall(r"'([^']+)' is a required property", err.message)
            key = missing[0] if missing else "?"
            missing_at.append((format_path(parts), key))
        elif err.validator == "enum":
            allowed = ", ".join(map(str, err.validator_value))
            found.append(
                (format_path(parts), f"{err.instance!r} is not allowed; fix: use one of {allowed}")
            )
        else:
            found.append((format_path(parts), f"{err.message}; fix: follow the {kind} CRD schema"))
    for where, key in missing_at:
        if (where, key) not in suggested:
            path = f"{where}.{key}" if where != "(top level)" else key
            found.append((path, f"required field missing; fix: add `{key}`"))
    return found


def _quantity(value: Any) -> float | None:
    """A Kubernetes CPU/GPU quantity ("2", 2, "500m") as a number; None if not one."""
    text = str(value).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


def _group_errors(group: Any, path: list) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if not isinstance(group, dict):
        return found
    params = group.get("rayStartParams") or {}
    params = params if isinstance(params, dict) else {}
    if "labels" in params:
        found.append(
            (
                format_path([*path, "rayStartParams", "labels"]),
                "Ray node labels in rayStartParams are not supported by KubeRay; fix: move them "
                f"to the group's `labels` field ({format_path([*path, 'labels'])}: "
                "{ray.io/market-type: spot})",
            )
        )
    set_in_params = [k for k in RESOURCE_PARAMS if k in params]
    if group.get("resources") and set_in_params:
        found.append(
            (
                format_path([*path, "rayStartParams", set_in_params[0]]),
                f"resources set twice: in `resources` and in rayStartParams "
                f"({', '.join(set_in_params)}); fix: keep only the group's `resources` field",
            )
        )
    containers = (((group.get("template") or {}).get("spec") or {}).get("containers")) or []
    ray_container = containers[0] if containers and isinstance(containers[0], dict) else {}
    res = ray_container.get("resources") or {}
    for param, k8s_name in (("num-cpus", "cpu"), ("num-gpus", "nvidia.com/gpu")):
        if param not in params:
            continue
        ray_value = _quantity(params[param])
        limit = (res.get("limits") or {}).get(k8s_name, (res.get("requests") or {}).get(k8s_name))
        k8s_value = _quantity(limit) if limit is not None else None
        if ray_value and k8s_value is not None and ray_value != k8s_value:
            found.append(
                (
                    format_path([*path, "rayStartParams", param]),
                    f"resources set twice: {param}={params[param]!r} but the Ray container's "
                    f"{k8s_name} limit is {limit!r}; fix: drop `{param}` (KubeRay derives it from "
                    f"the container) or make them equal",
                )
            )
    return found


def _cluster_errors(spec: Any, path: list) -> list[tuple[str, str]]:
    if not isinstance(spec, dict):
        return []
    found = _group_errors(spec.get("headGroupSpec"), [*path, "headGroupSpec"])
    workers = spec.get("workerGroupSpecs") or []
    seen: dict[str, int] = {}
    for i, group in enumerate(workers if isinstance(workers, list) else []):
        gpath = [*path, "workerGroupSpecs", i]
        found += _group_errors(group, gpath)
        if not isinstance(group, dict):
            continue
        name = group.get("groupName")
        if name in seen:
            found.append(
                (
                    format_path([*gpath, "groupName"]),
                    f"group name {name!r} is already used by workerGroupSpecs[{seen[name]}]; "
                    "fix: give each worker group its own name",
                )
            )
        seen.setdefault(name, i)
        lo, hi, n = (group.get(k) for k in ("minReplicas", "maxReplicas", "replicas"))
        ints = [v for v in (lo, hi, n) if v is not None]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            continue  # the schema reports the wrong type
        lo = 0 if lo is None else lo
        hi = 2**31 - 1 if hi is None else hi
        if lo > hi:
            found.append(
                (
                    format_path([*gpath, "minReplicas"]),
                    f"minReplicas {lo} > maxReplicas {hi}; fix: make minReplicas <= maxReplicas",
                )
            )
        elif n is not None and not lo <= n <= hi:
            found.append(
                (
                    format_path([*gpath, "replicas"]),
                    f"replicas {n} is outside [minReplicas {lo}, maxReplicas {hi}]; "
                    "fix: set replicas within them (or drop it)",
                )
            )
    return found


def _import_path_error(import_path: str, repo_root: Path) -> str | None:
    module, sep, attr = import_path.partition(":")
    if not sep:
        module, _, attr = import_path.rpartition(".")
    base = repo_root.joinpath(*module.split(".")) if module else repo_root / "?"
    source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    if not source.is_file():
        return f"module `{module}` is not in this repository (no {base.relative_to(repo_root)}.py)"
    tree = ast.parse(source.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    if attr not in names:
        return f"`{module}` ({source.relative_to(repo_root)}) defines no `{attr}`"
    return None


def _service_errors(spec: dict, repo_root: Path) -> list[tuple[str, str]]:
    text = spec.get("serveConfigV2")
    if not isinstance(text, str):
        return []
    where = ["spec", "serveConfigV2"]
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [(format_path(where), f"does not parse as YAML ({exc}); fix: correct the YAML")]
    apps = config.get("applications") if isinstance(config, dict) else None
    if not isinstance(apps, list) or not apps:
        return [
            (
                format_path([*where, "applications"]),
                "no applications; fix: list the Serve applications as in configs/serve.yaml",
            )
        ]
    found = []
    for i, app in enumerate(apps):
        apath = [*where, "applications", i]
        if not isinstance(app, dict) or not isinstance(app.get("import_path"), str):
            found.append(
                (format_path([*apath, "import_path"]), "missing; fix: set `module:attribute`")
            )
            continue
        problem = _import_path_error(app["import_path"], repo_root)
        if problem:
            found.append(
                (
                    format_path([*apath, "import_path"]),
                    f"{app['import_path']!r}: {problem}; fix: use the import_path of "
                    "configs/serve.yaml (serving.app:app_builder)",
                )
            )
        cfg = (app.get("args") or {}).get("config") if isinstance(app.get("args"), dict) else None
        if isinstance(cfg, str) and "://" not in cfg and not (repo_root / cfg).is_file():
            found.append(
                (
                    format_path([*apath, "args", "config"]),
                    f"{cfg!r} is not a file in this repository; fix: name a pipeline config "
                    "under configs/",
                )
            )
    return found


def _job_errors(spec: dict, repo_root: Path) -> list[tuple[str, str]]:
    entry = spec.get("entrypoint")
    if not isinstance(entry, str):
        return []
    try:
        argv = shlex.split(entry)
    except ValueError as exc:
        return [(format_path(["spec", "entrypoint"]), f"{exc}; fix: balance the quotes")]
    argv = [part for arg in argv for part in arg.split("=", 1)]  # --config=FILE too
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--config" and "://" not in value and not (repo_root / value).is_file():
            return [
                (
                    format_path(["spec", "entrypoint"]),
                    f"--config {value} is not a file in this repository; fix: name a config "
                    "under configs/",
                )
            ]
    return []


def validate_manifest(path, crd_dir=None, repo_root=None) -> list[str]:
    """Errors in the KubeRay manifest at `path`, each `FILE: KEY PATH: problem; fix: ...`."""
    path = Path(path)
    crd_dir = Path(crd_dir) if crd_dir is not None else CRD_DIR
    repo_root = Path(repo_root) if repo_root is not None else REPO_ROOT
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as exc:
        return [f"{path}: cannot read it ({exc}); fix: check the path"]
    except yaml.YAMLError as exc:
        return [f"{path}: not valid YAML ({exc}); fix: correct the YAML syntax"]
    if not docs:
        return [f"{path}: empty file; fix: write a RayCluster, RayJob or RayService manifest"]
    errors: list[str] = []
    for n, doc in enumerate(docs):
        prefix = f"{path}" + (f" (document {n + 1})" if len(docs) > 1 else "")
        if not isinstance(doc, dict):
            errors.append(f"{prefix}: (top level): not a mapping; fix: write a KubeRay object")
            continue
        kind = doc.get("kind")
        if kind not in KIND_FILES:
            errors.append(
                f"{prefix}: kind: {kind!r} is not a KubeRay kind; fix: use one of "
                f"{', '.join(KIND_FILES)}"
            )
            continue
        if doc.get("apiVersion") != API_VERSION:
            errors.append(
                f"{prefix}: apiVersion: {doc.get('apiVersion')!r}; fix: use {API_VERSION}"
            )
        try:
            found = _schema_errors(doc, kind, crd_dir)
        except CRDMissing as exc:
            return [f"{prefix}: {exc}"]
        spec = doc.get("spec")
        if isinstance(spec, dict):
            key = CLUSTER_SPEC_KEY[kind]
            cluster = spec if key is None else spec.get(key)
            found += _cluster_errors(cluster, ["spec"] if key is None else ["spec", key])
            if kind == "RayService":
                found += _service_errors(spec, repo_root)
            if kind == "RayJob":
                found += _job_errors(spec, repo_root)
        errors += [f"{prefix}: {where}: {problem}" for where, problem in found]
    return errors
