"""Data fingerprints (schema, rows, content hash) recorded by every stage's output."""

from __future__ import annotations

import polars as pl
import pyarrow as pa


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
