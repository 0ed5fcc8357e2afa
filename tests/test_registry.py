"""Registry: versions, aliases, rollback, checksums, crash safety, no pickle, and the CLI.

Tests that change the registry work on a copy of the one `pipeline_run` built, so the shared
registry (which the serving tests load) keeps version 1 as `production`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import xgboost as xgb
import yaml

from jobs import registry
from jobs.featurespec import FeatureSpec
from jobs.registry import BundleError, get_alias, list_versions, load_bundle, publish
from jobs.storage import Storage, join

ROOT = Path(__file__).resolve().parents[1]


def write_config(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


def version_dir(registry_uri: str, name: str, version: int) -> Path:
    return Path(registry_uri, name, "versions", f"{version:06d}")


@pytest.fixture
def shared(pipeline_run):
    """(storage, registry_uri, name, config, result) of the shared pipeline run (read only)."""
    config, result = pipeline_run
    return Storage(config.s3), join(config.storage, "registry"), config.name, config, result


@pytest.fixture
def copy(pipeline_run, tmp_path):
    """A private copy of the shared registry under tmp_path/registry; same tuple as `shared`."""
    config, result = pipeline_run
    shutil.copytree(Path(config.storage, "registry"), tmp_path / "registry")
    private = config.model_copy(update={"storage": str(tmp_path)})
    return Storage(config.s3), str(tmp_path / "registry"), config.name, private, result


def publish_again(storage: Storage, registry_uri: str, name: str, result) -> int:
    """Publishes the shared run once more, with the first version's threshold and lineage."""
    first = load_bundle(storage, registry_uri, name, 1)
    return publish(
        storage, registry_uri, name, result.run_uri, first.threshold, result.metrics, first.lineage
    )


def test_pipeline_publishes_version_one_as_production(shared):
    storage, registry_uri, name, _, result = shared
    assert result.version == 1
    assert result.promoted, result.gate
    assert list_versions(storage, registry_uri, name) == [1]
    assert get_alias(storage, registry_uri, name, "production")["version"] == 1
    assert get_alias(storage, registry_uri, name, "candidate")["version"] == 1


def test_load_bundle_returns_model_spec_lookups_and_threshold(shared):
    storage, registry_uri, name, _, result = shared
    bundle = load_bundle(storage, registry_uri, name)  # the `production` alias
    assert (bundle.name, bundle.version) == (name, 1)

    assert isinstance(bundle.booster, xgb.Booster)
    run_model = Path(result.metrics["model_uri"]).read_bytes()  # the training's own model
    assert (version_dir(registry_uri, name, 1) / "model.ubj").read_bytes() == run_model
    assert bundle.booster.num_features() == len(bundle.spec.feature_names)

    assert isinstance(bundle.spec, FeatureSpec)
    run_spec = json.loads(Path(result.run_uri, "features", "feature_spec.json").read_text())
    assert bundle.spec == FeatureSpec.model_validate(run_spec)

    run_lookups = {
        p.stem
        for p in Path(result.run_uri, "features", "lookups").iterdir()
        if not p.name.startswith((".", "_"))
    }
    assert set(bundle.lookups) == run_lookups
    assert {j.source for j in bundle.spec.joins} | {"history"} <= set(bundle.lookups)
    for lookup_name, table in bundle.lookups.items():
        assert isinstance(table, pa.Table)
        assert table.num_rows > 0, lookup_name

    assert 0.0 < bundle.threshold < 1.0
    assert bundle.threshold == pytest.approx(result.metrics["threshold"])
    assert bundle.metrics["pr_auc"] == pytest.approx(result.metrics["pr_auc"])
    assert bundle.lineage["run_uri"] == result.run_uri
    assert bundle.info["version"] == 1

    # The loaded model really is a model: it scores a feature matrix into probabilities.
    rng = np.random.default_rng(0)
    scores = bundle.booster.inplace_predict(
        rng.normal(size=(50, len(bundle.spec.feature_names))).astype(np.float32)
    )
    assert scores.shape == (50,) and np.all((scores >= 0) & (scores <= 1))


def test_second_publish_set_alias_and_rollback(copy):
    storage, registry_uri, name, _, result = copy
    assert publish_again(storage, registry_uri, name, result) == 2
    assert list_versions(storage, registry_uri, name) == [1, 2]
    # Publishing never moves an alias by itself.
    assert load_bundle(storage, registry_uri, name).version == 1

    pointer = registry.set_alias(storage, registry_uri, name, "production", 2, reason="test")
    assert pointer["version"] == 2 and pointer["history"] == [1]
    assert load_bundle(storage, registry_uri, name, "production").version == 2
    assert load_bundle(storage, registry_uri, name, 1).version == 1  # old versions stay

    pointer = registry.rollback(storage, registry_uri, name)
    assert pointer["version"] == 1
    assert load_bundle(storage, registry_uri, name, "production").version == 1
    with pytest.raises(BundleError, match="no earlier version"):
        registry.rollback(storage, registry_uri, name)
    assert get_alias(storage, registry_uri, name, "production")["version"] == 1


def test_set_alias_to_unpublished_version_is_refused(copy):
    storage, registry_uri, name, _, _ = copy
    with pytest.raises(BundleError, match="no published version 7"):
        registry.set_alias(storage, registry_uri, name, "production", 7)
    assert get_alias(storage, registry_uri, name, "production")["version"] == 1


def test_rollback_without_history_raises(copy):
    storage, registry_uri, name, _, _ = copy
    before = get_alias(storage, registry_uri, name, "production")
    assert before["history"] == []
    with pytest.raises(BundleError, match="no earlier version"):
        registry.rollback(storage, registry_uri, name, "production")
    assert get_alias(storage, registry_uri, name, "production") == before
    with pytest.raises(BundleError, match="'staging'"):
        registry.rollback(storage, registry_uri, name, "staging")
    with pytest.raises(BundleError, match="no alias 'staging'"):
        load_bundle(storage, registry_uri, name, "staging")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_spec(path: Path) -> None:
    spec = json.loads(path.read_text())
    first = next(iter(spec["medians"]))
    spec["medians"][first] += 1.0  # still a valid spec: only the checksum can tell
    path.write_text(json.dumps(spec))


@pytest.mark.parametrize(
    ("target", "tamper", "message"),
    [
        ("feature_spec.json", _edit_spec, "feature_spec.json fails its checksum"),
        ("model.ubj", _flip_byte, "model.ubj fails its checksum"),
        ("metrics.json", _flip_byte, "metrics.json fails its checksum"),
        ("lookup", Path.unlink, "file lookups/{lookup} is missing"),
    ],
)
def test_tampered_bundle_is_refused_naming_the_file(copy, target, tamper, message):
    storage, registry_uri, name, _, _ = copy
    folder = version_dir(registry_uri, name, 1)
    lookup = sorted((folder / "lookups").glob("*.parquet"))[0].name
    path = folder / "lookups" / lookup if target == "lookup" else folder / target
    tamper(path)
    with pytest.raises(BundleError, match=message.format(lookup=lookup).replace(".", r"\.")):
        load_bundle(storage, registry_uri, name)


def test_version_without_manifest_does_not_exist(copy):
    storage, registry_uri, name, _, _ = copy
    (version_dir(registry_uri, name, 1) / "manifest.json").unlink()
    assert list_versions(storage, registry_uri, name) == []
    with pytest.raises(BundleError, match="no manifest"):
        load_bundle(storage, registry_uri, name)


class CrashOnManifest(Storage):
    """Storage that dies just before the manifest (the commit point of a publish) is written."""

    def write_json(self, uri: str, payload: dict) -> None:
        if uri.endswith("/manifest.json"):
            raise OSError(f"simulated crash while writing {uri}")
        super().write_json(uri, payload)


def test_crash_while_publishing_changes_nothing_visible(copy):
    storage, registry_uri, name, _, result = copy
    versions = list_versions(storage, registry_uri, name)
    production = get_alias(storage, registry_uri, name, "production")
    first = load_bundle(storage, registry_uri, name, 1)

    with pytest.raises(OSError, match="simulated crash"):
        publish(
            CrashOnManifest(storage.s3),
            registry_uri,
            name,
            result.run_uri,
            first.threshold,
            result.metrics,
            first.lineage,
        )

    half = version_dir(registry_uri, name, 2)
    assert (half / "model.ubj").exists(), "the crash should come after the data files"
    assert not (half / "manifest.json").exists()
    assert list_versions(storage, registry_uri, name) == versions == [1]
    assert get_alias(storage, registry_uri, name, "production") == production
    with pytest.raises(BundleError, match="no manifest"):
        load_bundle(storage, registry_uri, name, 2)
    with pytest.raises(BundleError, match="no published version 2"):
        registry.set_alias(storage, registry_uri, name, "production", 2)
    assert load_bundle(storage, registry_uri, name).version == 1

    # The next publish succeeds and never hands out the half-written folder as a version.
    version = publish_again(storage, registry_uri, name, result)
    assert list_versions(storage, registry_uri, name) == [1, version]
    assert load_bundle(storage, registry_uri, name, version).version == version


def test_bundle_files_are_data_not_pickle(shared):
    storage, registry_uri, name, _, _ = shared
    folder = version_dir(registry_uri, name, 1)
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    manifest = json.loads(files.pop("manifest.json").read_text())
    assert set(files) == set(manifest["files"]), "every file is covered by a checksum"
    for relative, path in files.items():
        head = path.read_bytes()[:4]
        assert not relative.endswith((".pkl", ".pickle", ".joblib")), relative
        assert not head.startswith(b"\x80"), f"{relative} starts with a pickle protocol byte"
        if relative.endswith(".json"):
            json.loads(path.read_text())
        elif relative.endswith(".parquet"):
            assert head == b"PAR1" and path.read_bytes()[-4:] == b"PAR1", relative
        else:
            assert relative == "model.ubj" and head[:1] == b"{", relative  # UBJSON object


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(COLUMNS="200", NO_COLOR="1")
    return subprocess.run(
        [sys.executable, "-m", "jobs.registry", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def table_rows(output: str) -> dict[int, str]:
    """The rich table's rows by version number."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells and cells[0].isdigit():
            rows[int(cells[0])] = line
    return rows


def test_cli_list_and_show(shared, tmp_path):
    _, _, _, config, result = shared
    path = write_config(config, tmp_path / "config.yaml")

    listed = run_cli("list", "--config", str(path))
    assert listed.returncode == 0, listed.stderr
    rows = table_rows(listed.stdout)
    assert list(rows) == [1], listed.stdout
    assert "production" in rows[1] and "candidate" in rows[1]
    assert f"{result.metrics['pr_auc']:.4f}" in rows[1]

    shown = run_cli("show", "--config", str(path), "production")
    assert shown.returncode == 0, shown.stderr
    body = json.loads(shown.stdout)
    assert body["info"]["version"] == 1 and body["info"]["name"] == config.name
    assert body["metrics"]["pr_auc"] == pytest.approx(result.metrics["pr_auc"])
    assert body["lineage"]["run_uri"] == result.run_uri


def test_cli_promote_rollback_and_errors(copy, tmp_path):
    storage, registry_uri, name, config, result = copy
    path = write_config(config, tmp_path / "config.yaml")
    publish_again(storage, registry_uri, name, result)

    promoted = run_cli("promote", "--config", str(path), "2")
    assert promoted.returncode == 0, promoted.stderr
    assert f"{name}:production -> version 2" in promoted.stdout
    rows = table_rows(run_cli("list", "--config", str(path)).stdout)
    assert sorted(rows) == [1, 2]
    assert "production" in rows[2] and "production" not in rows[1]

    rolled = run_cli("rollback", "--config", str(path))
    assert rolled.returncode == 0, rolled.stderr
    assert f"{name}:production -> version 1" in rolled.stdout
    assert get_alias(storage, registry_uri, name, "production")["version"] == 1

    missing = run_cli("show", "--config", str(path), "9")
    assert missing.returncode != 0
    assert "no manifest" in missing.stdout + missing.stderr
