"""The whole pipeline against S3 (a moto server over real HTTP): everything lands in the bucket."""

from __future__ import annotations

import io
import json
import os

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jobs import registry
from jobs.storage import Storage
from tests.conftest import make_config

pytestmark = pytest.mark.slow


def s3_filesystem(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=endpoint.removeprefix("http://"), scheme="http", region="us-east-1"
    )


def keys_under(fs: pafs.S3FileSystem, prefix: str) -> set[str]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {info.path for info in infos if info.type == pafs.FileType.File}


def parquet_rows(fs: pafs.S3FileSystem, keys: set[str]) -> int:
    return sum(pq.read_metadata(io.BytesIO(fs.open_input_file(k).read())).num_rows for k in keys)


def test_pipeline_on_s3_writes_everything_to_the_bucket(
    ray_session, sample_data, s3_bucket, tmp_path, monkeypatch
):
    from jobs.pipeline import run_pipeline

    endpoint, bucket = s3_bucket
    fs = s3_filesystem(endpoint)
    pafs.copy_files(
        str(sample_data),
        f"{bucket}/data",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=fs,
    )
    assert any(k.endswith(".parquet") for k in keys_under(fs, f"{bucket}/data/transactions"))

    worker_cwd = ray_session.get(ray_session.remote(lambda: os.getcwd()).remote())
    existed = {name: os.path.exists(os.path.join(worker_cwd, name)) for name in ("s3:", bucket)}
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)

    config = make_config(
        f"s3://{bucket}/data", f"s3://{bucket}/artifacts", **{"s3.endpoint_url": endpoint}
    )
    result = run_pipeline(config, quiet=True)

    # Nothing local: not in the driver's cwd, not in the Ray workers' cwd.
    assert list(workdir.iterdir()) == []
    for name, was_there in existed.items():
        assert os.path.exists(os.path.join(worker_cwd, name)) == was_there, name

    prefix = f"s3://{bucket}/artifacts/runs/"
    assert result.run_uri.startswith(prefix)
    run = result.run_uri.removeprefix("s3://")
    written = keys_under(fs, f"{bucket}/artifacts")

    # Registry: a published version with its model and manifest, and the candidate alias.
    version = f"{bucket}/artifacts/registry/{config.name}/versions/{result.version:06d}"
    for name in ("model.ubj", "manifest.json", "feature_spec.json", "lookups/history.parquet"):
        assert f"{version}/{name}" in written, name
    aliases = f"{bucket}/artifacts/registry/{config.name}/aliases"
    assert f"{aliases}/candidate.json" in written
    assert (f"{aliases}/production.json" in written) == result.promoted
    bundle = registry.load_bundle(
        Storage(config.s3), f"s3://{bucket}/artifacts/registry", config.name, result.version
    )
    assert bundle.booster.num_boosted_rounds() > 0  # checksums verified through S3

    # The run's own outputs: model, quarantine rows and feature splits, all in the bucket.
    model = result.metrics["model_uri"].removeprefix("s3://")
    assert model.startswith(f"{run}/train/models/") and model in written
    report = json.loads(fs.open_input_file(f"{run}/ingest/_report.json").read())
    for source in ("transactions", "customers", "merchants"):
        rows = {k for k in written if k.startswith(f"{run}/quarantine/{source}/rows/")}
        assert rows, source
        assert parquet_rows(fs, rows) == report[source]["rows_quarantined"] > 0, source
    split_rows = 0
    for split in ("train", "valid", "test"):
        parts = {k for k in written if k.startswith(f"{run}/features/{split}/")}
        assert parts and all(k.endswith(".parquet") for k in parts), split
        split_rows += parquet_rows(fs, parts)
    assert split_rows == report["transactions"]["rows_out"]
