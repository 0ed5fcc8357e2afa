"""Registry: immutable, versioned model bundles and movable aliases on any storage URI.

A bundle is data only: XGBoost UBJSON, the FeatureSpec and lookup tables (JSON, parquet),
metrics and lineage, plus a manifest of SHA-256 checksums written last. A version without a
manifest does not exist; an alias is one small object replaced atomically, so a crash while
publishing never changes what `production` points to. Loading a bundle runs no code.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated

import pyarrow as pa
import pyarrow.parquet as pq
import typer
import xgboost as xgb

from jobs.errors import BundleError
from jobs.featurespec import FeatureSpec
from jobs.storage import Storage, join

MANIFEST = "manifest.json"


@dataclass
class Bundle:
    name: str
    version: int
    booster: xgb.Booster
    spec: FeatureSpec
    lookups: dict[str, pa.Table]
    threshold: float
    metrics: dict
    lineage: dict
    info: dict = field(default_factory=dict)


def _version_dir(registry_uri: str, name: str, version: int) -> str:
    return join(registry_uri, name, "versions", f"{version:06d}")


def list_versions(storage: Storage, registry_uri: str, name: str) -> list[int]:
    """Published versions (those with a manifest), oldest first."""
    root = join(registry_uri, name, "versions")
    if not storage.exists(root):
        return []
    versions = set()
    for uri in storage.list_files(root):
        relative = uri.split("/versions/", 1)[1]
        folder, _, rest = relative.partition("/")
        if rest == MANIFEST and folder.isdigit():
            versions.add(int(folder))
    return sorted(versions)


def _next_version(storage: Storage, registry_uri: str, name: str) -> int:
    root = join(registry_uri, name, "versions")
    if not storage.exists(root):
        return 1
    folders = {uri.split("/versions/", 1)[1].split("/")[0] for uri in storage.list_files(root)}
    return max([int(f) for f in folders if f.isdigit()], default=0) + 1


def library_versions() -> dict:
    import ray

    return {
        "python": platform.python_version(),
        "ray": ray.__version__,
        "xgboost": xgb.__version__,
        "pyarrow": pa.__version__,
    }


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def publish(
    storage: Storage,
    registry_uri: str,
    name: str,
    run_uri: str,
    threshold: float,
    metrics: dict,
    lineage: dict,
) -> int:
    """Copies a run's model, spec and lookups into a new immutable version; returns it."""
    version = _next_version(storage, registry_uri, name)
    folder = _version_dir(registry_uri, name, version)
    features = join(run_uri, "features")
    files = {
        "model.ubj": storage.read_bytes(join(run_uri, "train", "model.ubj")),
        "feature_spec.json": storage.read_bytes(join(features, "feature_spec.json")),
    }
    for uri in storage.list_files(join(features, "lookups")):
        files[f"lookups/{uri.rsplit('/', 1)[1]}"] = storage.read_bytes(uri)
    now = datetime.now(timezone.utc).isoformat()
    info = {
        "name": name,
        "version": version,
        "threshold": threshold,
        "created": now,
        "run_uri": run_uri,
    }
    for file_name, payload in (
        ("metrics.json", metrics),
        ("lineage.json", lineage),
        ("bundle.json", info),
    ):
        files[file_name] = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
    for relative, data in files.items():
        storage.write_bytes(join(folder, relative), data)
    checksums = {relative: hashlib.sha256(data).hexdigest() for relative, data in files.items()}
    storage.write_json(
        join(folder, MANIFEST),
        {"name": name, "version": version, "files": checksums, "created": now},
    )
    return version


def get_alias(storage: Storage, registry_uri: str, name: str, alias: str) -> dict | None:
    uri = join(registry_uri, name, "aliases", f"{alias}.json")
    return storage.read_json(uri) if storage.exists(uri) else None


def set_alias(
    storage: Storage, registry_uri: str, name: str, alias: str, version: int, reason: str = ""
) -> dict:
    """Points `alias` at `version` (which must be published), remembering the previous one."""
    if version not in list_versions(storage, registry_uri, name):
        raise BundleError(f"model {name!r} has no published version {version}")
    current = get_alias(storage, registry_uri, name, alias) or {"history": []}
    history = list(current.get("history", []))
    if "version" in current and current["version"] != version:
        history.append(current["version"])
    pointer = {
        "version": version,
        "history": history[-50:],
        "reason": reason,
        "updated": datetime.now(timezone.utc).isoformat(),
    }
    storage.write_json(join(registry_uri, name, "aliases", f"{alias}.json"), pointer)
    return pointer


def rollback(storage: Storage, registry_uri: str, name: str, alias: str = "production") -> dict:
    """Moves `alias` back to the version it pointed to before."""
    current = get_alias(storage, registry_uri, name, alias)
    if not current or not current.get("history"):
        raise BundleError(
            f"alias {alias!r} of model {name!r} has no earlier version to roll back to"
        )
    history = list(current["history"])
    previous = history.pop()
    pointer = {
        "version": previous,
        "history": history,
        "reason": f"rollback from {current['version']}",
        "updated": datetime.now(timezone.utc).isoformat(),
    }
    storage.write_json(join(registry_uri, name, "aliases", f"{alias}.json"), pointer)
    return pointer


def resolve(storage: Storage, registry_uri: str, name: str, ref: str | int) -> int:
    """A version number from a version or an alias name."""
    if isinstance(ref, int) or str(ref).isdigit():
        return int(ref)
    pointer = get_alias(storage, registry_uri, name, str(ref))
    if pointer is None:
        raise BundleError(f"model {name!r} has no alias {ref!r} under {registry_uri}")
    return int(pointer["version"])


def load_bundle(
    storage: Storage, registry_uri: str, name: str, ref: str | int = "production"
) -> Bundle:
    """Loads and verifies a bundle; every file must match the manifest's checksum."""
    version = resolve(storage, registry_uri, name, ref)
    folder = _version_dir(registry_uri, name, version)
    if not storage.exists(join(folder, MANIFEST)):
        raise BundleError(f"model {name!r} version {version}: no manifest at {folder}")
    manifest = storage.read_json(join(folder, MANIFEST))
    data = {}
    for relative, expected in manifest["files"].items():
        uri = join(folder, relative)
        if not storage.exists(uri):
            raise BundleError(f"model {name!r} version {version}: file {relative} is missing")
        content = storage.read_bytes(uri)
        if hashlib.sha256(content).hexdigest() != expected:
            raise BundleError(
                f"model {name!r} version {version}: {relative} fails its checksum (tampered?)"
            )
        data[relative] = content
    booster = xgb.Booster()
    booster.load_model(bytearray(data["model.ubj"]))
    info = json.loads(data["bundle.json"])
    lookups = {
        relative.removeprefix("lookups/").removesuffix(".parquet"): pq.read_table(io.BytesIO(blob))
        for relative, blob in data.items()
        if relative.startswith("lookups/")
    }
    return Bundle(
        name=name,
        version=version,
        booster=booster,
        spec=FeatureSpec.model_validate_json(data["feature_spec.json"]),
        lookups=lookups,
        threshold=float(info["threshold"]),
        metrics=json.loads(data["metrics.json"]),
        lineage=json.loads(data["lineage.json"]),
        info=info,
    )


app = typer.Typer(help="List, inspect, promote and roll back model versions.")


def _context(config: str):
    from jobs.config import load_config

    loaded = load_config(config)
    return Storage(loaded.s3), join(loaded.storage, "registry"), loaded.name


@app.command("list")
def list_command(config: Annotated[str, typer.Option(help="Pipeline config YAML")]) -> None:
    """Versions with their primary metrics and aliases."""
    from rich.table import Table

    from jobs.summary import console

    storage, registry_uri, name = _context(config)
    aliases_root = join(registry_uri, name, "aliases")
    aliases: dict[int, list[str]] = {}
    if storage.exists(aliases_root):
        for uri in storage.list_files(aliases_root):
            alias = uri.rsplit("/", 1)[1].removesuffix(".json")
            aliases.setdefault(storage.read_json(uri)["version"], []).append(alias)
    table = Table(title=f"model {name}")
    for column in ("version", "aliases", "pr_auc", "roc_auc", "threshold", "created"):
        table.add_column(column)
    for version in list_versions(storage, registry_uri, name):
        folder = _version_dir(registry_uri, name, version)
        metrics, info = (
            storage.read_json(join(folder, f)) for f in ("metrics.json", "bundle.json")
        )
        table.add_row(
            str(version),
            ", ".join(aliases.get(version, [])),
            f"{metrics.get('pr_auc') or 0:.4f}",
            f"{metrics.get('roc_auc') or 0:.4f}",
            f"{info['threshold']:.4f}",
            info["created"][:19],
        )
    console.print(table)


@app.command()
def show(
    config: Annotated[str, typer.Option(help="Pipeline config YAML")],
    ref: Annotated[str, typer.Argument(help="version or alias")] = "production",
) -> None:
    """One bundle's metadata, metrics and lineage (verifies checksums)."""
    from jobs.summary import console

    storage, registry_uri, name = _context(config)
    bundle = load_bundle(storage, registry_uri, name, ref)
    headline = {
        k: bundle.metrics.get(k) for k in ("roc_auc", "pr_auc", "precision", "recall", "f1")
    }
    console.print_json(data={"info": bundle.info, "metrics": headline, "lineage": bundle.lineage})


@app.command()
def promote(
    config: Annotated[str, typer.Option(help="Pipeline config YAML")],
    version: Annotated[int, typer.Argument(help="version to point the alias at")],
    alias: Annotated[str, typer.Option(help="alias to move")] = "production",
) -> None:
    """Point an alias at a version (by hand, bypassing the gate)."""
    storage, registry_uri, name = _context(config)
    pointer = set_alias(storage, registry_uri, name, alias, version, reason="manual promote")
    typer.echo(f"{name}:{alias} -> version {pointer['version']}")


@app.command("rollback")
def rollback_command(
    config: Annotated[str, typer.Option(help="Pipeline config YAML")],
    alias: Annotated[str, typer.Option(help="alias to move back")] = "production",
) -> None:
    """Move an alias back to the version it pointed to before."""
    storage, registry_uri, name = _context(config)
    pointer = rollback(storage, registry_uri, name, alias)
    typer.echo(f"{name}:{alias} -> version {pointer['version']}")


if __name__ == "__main__":
    from jobs.entrypoint import run_cli

    run_cli(app)
