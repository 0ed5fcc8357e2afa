"""Registry: immutable, versioned model bundles and movable aliases on any storage URI.

A bundle is data only: XGBoost UBJSON, the FeatureSpec and lookup tables (JSON, parquet),
metrics and lineage, optional extra files (e.g. `calibration.json`), plus a manifest of SHA-256
checksums written last. A version without a manifest does not exist. Concurrent publishers
never share a version folder: each first claims one with an exclusive create
(`jobs.versions`); aliases move by compare-and-swap (`jobs.aliases`), so a crash or a race
never changes what `production` points to behind anyone's back. Loading a bundle runs no code.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any

import pyarrow as pa
import pyarrow.parquet as pq
import typer
import xgboost as xgb

from jobs.aliases import get_alias, rollback, set_alias
from jobs.errors import BundleError
from jobs.featurespec import FeatureSpec
from jobs.metrics import HEADLINE
from jobs.runs import latest_model
from jobs.storage import Storage, join
from jobs.versions import CLAIM, MANIFEST, claim_version, list_versions, version_dir

__all__ = [
    "Bundle",
    "BundleError",
    "get_alias",
    "list_versions",
    "load_bundle",
    "publish",
    "resolve",
    "rollback",
    "set_alias",
]

STANDARD_FILES = {
    "model.ubj",
    "feature_spec.json",
    "metrics.json",
    "lineage.json",
    "bundle.json",
    MANIFEST,
    CLAIM,
}


@dataclass
class Bundle:
    name: str
    version: int
    booster: xgb.Booster
    spec: FeatureSpec
    lookups: dict[str, pa.Table]
    threshold: float | None  # binary only
    metrics: dict
    lineage: dict
    info: dict = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # extra files: parsed JSON or bytes

    @property
    def calibration(self) -> dict | None:
        """`calibration.json` if the bundle was published with one."""
        return self.extras.get("calibration.json")

    @property
    def reference(self) -> dict | None:
        """`reference.json` (train-split feature and score distributions, `jobs.drift`) if the
        bundle was published with one."""
        return self.extras.get("reference.json")


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


def _check_extra_file(relative: str, data: bytes) -> None:
    parts = relative.split("/")
    if (
        relative in STANDARD_FILES
        or relative.startswith("lookups/")
        or any(part in ("", ".", "..") or part.startswith((".", "_")) for part in parts)
    ):
        raise BundleError(
            f"extra bundle file {relative!r} is not allowed (a reserved, hidden or empty name)"
        )
    if relative.endswith(".json"):
        try:
            json.loads(data)
        except ValueError as error:
            raise BundleError(f"extra bundle file {relative!r} is not JSON: {error}") from None


def publish(
    storage: Storage,
    registry_uri: str,
    name: str,
    run_uri: str,
    threshold: float | None,
    metrics: dict,
    lineage: dict,
    *,
    model_uri: str | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> int:
    """Copies a run's model, spec and lookups into a new immutable version; returns it.

    Args:
        model_uri: the model to publish; default: the run's latest training's.
        extra_files: more files for the bundle by relative name (e.g. "calibration.json");
            they are covered by the manifest and `load_bundle` returns them in `extras`.
    """
    features = join(run_uri, "features")
    files = {
        "model.ubj": storage.read_bytes(model_uri or latest_model(storage, run_uri)),
        "feature_spec.json": storage.read_bytes(join(features, "feature_spec.json")),
    }
    lookups = join(features, "lookups")  # none when the features need no join or history
    for uri in storage.list_files(lookups) if storage.exists(lookups) else []:
        files[f"lookups/{uri.rsplit('/', 1)[1]}"] = storage.read_bytes(uri)
    for relative, data in (extra_files or {}).items():
        _check_extra_file(relative, data)
        files[relative] = bytes(data)

    # Everything is read before the claim, so a claimed folder is filled without delay.
    claim = claim_version(storage, registry_uri, name, run_uri)
    folder = version_dir(registry_uri, name, claim.version)
    now = datetime.now(timezone.utc).isoformat()
    info = {
        "name": name,
        "version": claim.version,
        "threshold": threshold,
        "created": now,
        "run_uri": run_uri,
        "publisher": claim.owner,
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
    checksums[CLAIM] = hashlib.sha256(claim.data).hexdigest()
    storage.write_json(
        join(folder, MANIFEST),
        {
            "name": name,
            "version": claim.version,
            "publisher": claim.owner,
            "files": checksums,
            "created": now,
        },
    )
    return claim.version


def resolve(storage: Storage, registry_uri: str, name: str, ref: str | int) -> int:
    """A version number from a version or an alias name."""
    if isinstance(ref, int) or (str(ref).isascii() and str(ref).isdigit()):
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
    folder = version_dir(registry_uri, name, version)
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
    extras = {
        relative: json.loads(blob) if relative.endswith(".json") else blob
        for relative, blob in data.items()
        if relative not in STANDARD_FILES and not relative.startswith(("lookups/", "_"))
    }
    return Bundle(
        name=name,
        version=version,
        booster=booster,
        spec=FeatureSpec.model_validate_json(data["feature_spec.json"]),
        lookups=lookups,
        threshold=None if info["threshold"] is None else float(info["threshold"]),
        metrics=json.loads(data["metrics.json"]),
        lineage=json.loads(data["lineage.json"]),
        info=info,
        extras=extras,
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
    for column in ("version", "aliases", "task", "metrics (test)", "threshold", "created"):
        table.add_column(column)
    for version in list_versions(storage, registry_uri, name):
        folder = version_dir(registry_uri, name, version)
        metrics, info = (
            storage.read_json(join(folder, f)) for f in ("metrics.json", "bundle.json")
        )
        table.add_row(
            str(version),
            ", ".join(aliases.get(version, [])),
            metrics.get("task", "binary"),
            _headline(metrics),
            "n/a" if info["threshold"] is None else f"{info['threshold']:.4f}",
            info["created"][:19],
        )
    console.print(table)


def _headline(metrics: dict) -> str:
    names = HEADLINE[metrics.get("task", "binary")][:3]
    return ", ".join(
        f"{n} {metrics[n]:.4f}" for n in names if isinstance(metrics.get(n), int | float)
    )


@app.command()
def show(
    config: Annotated[str, typer.Option(help="Pipeline config YAML")],
    ref: Annotated[str, typer.Argument(help="version or alias")] = "production",
) -> None:
    """One bundle's metadata, metrics and lineage (verifies checksums)."""
    from jobs.summary import console

    storage, registry_uri, name = _context(config)
    bundle = load_bundle(storage, registry_uri, name, ref)
    task = bundle.metrics.get("task", "binary")
    headline = {k: bundle.metrics.get(k) for k in HEADLINE[task]}
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
