"""Global key checks over all of a source's blocks: `unique` rules and dimension join keys.

Exact, and cheap at scale: each file's task hashes its keys to 64 bits in parallel
(`key_hashes`); one task finds the repeated hashes, and only rows carrying those have their
keys compared exactly, in block order, so the first valid occurrence of a key wins.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import ray

from jobs import validate


def key_hashes(block: pa.Table, columns: list[str]) -> pa.Table:
    """64-bit hashes of each key column, null where the row is invalid or the key null."""
    valid = pc.is_null(block.column(validate.REASON))
    hashes = {}
    for column in dict.fromkeys(columns):
        hashed = pa.array(pl.Series(block.column(column)).hash(seed=0).to_numpy())
        usable = pc.and_(valid, pc.is_valid(block.column(column)))
        hashes[column] = pc.if_else(usable, hashed, None)
    return pa.table(hashes) if hashes else pa.table({})


@ray.remote
def _repeated_hashes(column: str, *hashes: pa.Table) -> np.ndarray:
    """Hashes seen more than once among valid rows: a small superset of the duplicate keys."""
    values = pa.chunked_array([h.column(column) for h in hashes]).drop_null().to_numpy()
    unique, counts = np.unique(values, return_counts=True)
    return unique[counts > 1]


@ray.remote
def _candidates(block: pa.Table, hashes: pa.Table, column: str, repeated: np.ndarray):
    """(positions, keys) of the rows whose hash is repeated somewhere; few rows, exact keys."""
    mask = pc.fill_null(pc.is_in(hashes.column(column), value_set=pa.array(repeated)), False)
    positions = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
    return positions, block.column(column).take(pa.array(positions)).to_pylist()


def duplicate_positions(blocks: list, hashes: list, column: str) -> list[np.ndarray]:
    """Per block, positions of valid rows whose key already appeared earlier (first one wins)."""
    if not blocks:
        return []
    repeated = ray.get(_repeated_hashes.remote(column, *hashes))
    if len(repeated) == 0:
        return [np.array([], np.int64) for _ in blocks]
    found = ray.get(
        [
            _candidates.remote(block, hashed, column, repeated)
            for block, hashed in zip(blocks, hashes, strict=True)
        ]
    )
    seen: set = set()
    result = []
    for positions, keys in found:
        duplicated = []
        for position, key in zip(positions, keys, strict=True):
            if key in seen:
                duplicated.append(position)
            seen.add(key)
        result.append(np.array(duplicated, np.int64))
    return result
