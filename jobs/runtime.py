"""Plumbing shared by every stage: Ray start-up, run ids, the PII key, fingerprints."""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from datetime import datetime, timezone

import polars as pl
import pyarrow as pa

from jobs.config import Config, ConfigError

DEMO_PII_KEY = b"rayline-demo-key-not-for-production"
log = logging.getLogger("rayline")


def init_ray(config: Config | None = None, num_cpus: int | None = None) -> float:
    """Starts or joins Ray; returns the seconds it took.

    A driver started by `ray job submit` (the job supervisor sets RAY_JOB_CONFIG_JSON_ENV_VAR
    and RAY_ADDRESS) joins its cluster; anywhere else we start an embedded local Ray rather than
    attaching to whatever cluster an exported RAY_ADDRESS happens to name.
    """
    import ray

    if ray.is_initialized():
        return 0.0
    started = time.perf_counter()
    # Ray Train drains worker reports once per health-check interval (2 s by default); Ray Train
    # copies this variable from the driver into its controller at fit().
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        num_cpus = num_cpus or (config.ray.num_cpus if config else None)
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return time.perf_counter() - started


def new_run_id() -> str:
    """Sortable by time, unique across processes and within a second."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + f"-{uuid.uuid4().hex[:8]}"


def pii_key(config: Config) -> bytes:
    """The HMAC key for PII columns, from the environment variable the config names."""
    value = os.environ.get(config.pii.key_env)
    if value:
        return value.encode()
    if not config.pii.allow_demo_key:
        raise ConfigError(
            f"set {config.pii.key_env} to the secret key for hashing PII "
            "(or pii.allow_demo_key: true for sample data)"
        )
    warnings.warn(
        f"{config.pii.key_env} is not set: hashing PII with the public demo key",
        stacklevel=2,
    )
    return DEMO_PII_KEY


def table_hash(table: pa.Table) -> int:
    """Order-independent content hash of a table: the sum of its row hashes modulo 2**64.

    polars' `hash_rows` reads the Arrow buffers without copying; it measured 20x faster than
    pandas' `hash_pandas_object` here (13 ms vs 300 ms per 100k rows), which mattered at 2M rows.
    """
    if table.num_rows == 0:
        return 0
    hashes = pl.from_arrow(table).hash_rows(seed=0)
    return int(hashes.to_numpy().sum(dtype="uint64"))


def fingerprint(schema: pa.Schema, rows: int, content_hash: int) -> dict:
    return {
        "schema": {field.name: str(field.type) for field in schema},
        "rows": rows,
        "content_hash": f"{content_hash % 2**64:016x}",
        "hash": f"sum of polars {pl.__version__} hash_rows(seed=0)",
    }


class Stopwatch:
    """Records the seconds between laps into a dict, so a report can say where time went."""

    def __init__(self, into: dict):
        self.into, self.last = into, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.into[name] = round(self.into.get(name, 0.0) + now - self.last, 3)
        self.last = now


def _write_part_function(storage, table: pa.Table, target: str) -> int:
    if table.num_rows == 0:
        return 0
    storage.write_table(target, table)
    return 1


_write_part = None


def write_parquet_blocks(storage, blocks: list, uri: str, schema: pa.Schema | None = None) -> int:
    """Writes each block (an ObjectRef of an Arrow table) as `part-NNNNN.parquet` under `uri`,
    one Ray task per block; returns the number of files written.

    Measured on 2M rows: Ray Data's `write_parquet` spent ~2 s more than the same parquet
    encoding done by one task per block, mostly fixed cost per write.
    """
    import ray

    storage.delete(uri)  # a re-run replaces the output instead of mixing old and new parts
    global _write_part
    if _write_part is None:
        _write_part = ray.remote(_write_part_function)
    targets = [f"{uri.rstrip('/')}/part-{index:05d}.parquet" for index in range(len(blocks))]
    written = sum(
        ray.get(
            [
                _write_part.remote(storage, block, target)
                for block, target in zip(blocks, targets, strict=True)
            ]
        )
    )
    if written == 0:  # keep the schema discoverable even when every block is empty
        storage.write_table(
            f"{uri.rstrip('/')}/part-00000.parquet", (schema or pa.schema([])).empty_table()
        )
        written = 1
    return written


def run_cli(command) -> None:
    """Runs a typer command or app; a bad input (config, source, schema, training, registry or
    storage problem) exits 2 with one line naming what is wrong instead of a traceback."""
    import sys

    import typer

    from jobs.registry import BundleError
    from jobs.sources import SourceError
    from jobs.storage import StorageError
    from jobs.train import TrainingError
    from jobs.validate import SchemaError

    bad_input = (ConfigError, SourceError, SchemaError, TrainingError, BundleError, StorageError)
    try:
        command() if isinstance(command, typer.Typer) else typer.run(command)
    except bad_input as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
