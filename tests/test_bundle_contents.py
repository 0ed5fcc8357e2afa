"""A bundle carries what its features need and nothing else: no PII column (hashed or not)
and no unused dimension column ever reaches a bundle, a lookup table or a Serve replica."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.featurespec import STATE
from jobs.storage import join

pytestmark = pytest.mark.slow


def bundle_folder(config) -> Path:
    registry = Path(join(config.storage, "registry"), config.name, "versions")
    return sorted(p for p in registry.iterdir() if (p / "manifest.json").exists())[-1]


def test_bundle_lookups_hold_only_feature_columns_and_no_pii(pipeline_run):
    config, _ = pipeline_run
    folder = bundle_folder(config)
    manifest = json.loads((folder / "manifest.json").read_text())
    lookups = {
        name: pq.read_table(folder / name).column_names
        for name in manifest["files"]
        if name.startswith("lookups/")
    }
    assert set(lookups) == {
        "lookups/customers.parquet",
        "lookups/merchants.parquet",
        "lookups/history.parquet",
    }
    features = config.features
    used = {*features.numeric, *features.categorical}
    for derived in features.derived.values():
        used.update(derived.columns)
    pii = {
        column for source in config.sources.values() for column in source.pii
    }  # declared PII, by its name in its own source
    assert pii == {"email"}
    for join_cfg in config.joins:
        columns = lookups[f"lookups/{join_cfg.source}.parquet"]
        assert columns[0] == join_cfg.key
        for column in columns[1:]:
            assert join_cfg.prefix + column in used, f"{column} is in the bundle but unused"
            assert column not in pii
    assert lookups["lookups/history.parquet"] == [features.history.entity, *STATE]
    # Nothing in the bundle mentions a PII column, hashed or not.
    for name in manifest["files"]:
        if name.endswith(".parquet"):
            assert not pii & set(pq.read_table(folder / name).column_names), name
    spec = json.loads((folder / "feature_spec.json").read_text())
    assert not pii & {*spec["feature_names"]}
    # The customers table in ingest does carry the hashed email: pruning is what keeps it out.
    assert (
        "email"
        in pq.read_schema(
            next(Path(join(_run(pipeline_run), "ingest", "customers")).glob("*.parquet"))
        ).names
    )


def _run(pipeline_run) -> str:
    return pipeline_run[1].run_uri
