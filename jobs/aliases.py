"""Aliases ("production", "candidate"): one small pointer object per alias, moved atomically.

Every move (`set_alias`, `rollback`) reads the pointer with a token, computes the next pointer
from it and writes it with `Storage.compare_and_swap`; if another writer moved the alias in
between, the write is refused and the move is recomputed from the new pointer. So moves are
serialized: `sequence` counts them (each exactly once) and `history`, the stack `rollback` pops,
never loses one. A reader sees the old or the new pointer, never a mix.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from datetime import datetime, timezone

from jobs.errors import BundleError, ConflictError
from jobs.storage import Storage, join
from jobs.versions import list_versions

HISTORY_LIMIT = 50
MAX_MOVE_ATTEMPTS = 100


def alias_uri(registry_uri: str, name: str, alias: str) -> str:
    return join(registry_uri, name, "aliases", f"{alias}.json")


def get_alias(storage: Storage, registry_uri: str, name: str, alias: str) -> dict | None:
    found = storage.read_with_token(alias_uri(registry_uri, name, alias))
    return json.loads(found[0]) if found else None


def _move(
    storage: Storage,
    registry_uri: str,
    name: str,
    alias: str,
    change: Callable[[dict | None], dict],
) -> dict:
    """Applies `change` (current pointer -> version, history, reason) with compare-and-swap."""
    uri = alias_uri(registry_uri, name, alias)
    for attempt in range(MAX_MOVE_ATTEMPTS):
        found = storage.read_with_token(uri)
        current = json.loads(found[0]) if found else None
        pointer = {
            **change(current),
            "previous": current.get("version") if current else None,
            "sequence": (current or {}).get("sequence", 0) + 1,
            "updated": datetime.now(timezone.utc).isoformat(),
        }
        data = json.dumps(pointer, indent=2, sort_keys=True, default=str).encode()
        try:
            storage.compare_and_swap(uri, found[1] if found else None, data)
            return pointer
        except ConflictError:  # another move won; recompute from the pointer it wrote
            time.sleep(random.uniform(0, min(0.2, 0.002 * 2**attempt)))
    raise ConflictError(
        f"alias {alias!r} of model {name!r} kept moving under {uri}; "
        f"gave up after {MAX_MOVE_ATTEMPTS} attempts"
    )


def set_alias(
    storage: Storage, registry_uri: str, name: str, alias: str, version: int, reason: str = ""
) -> dict:
    """Points `alias` at `version` (which must be published), remembering the previous one."""
    if version not in list_versions(storage, registry_uri, name):
        raise BundleError(f"model {name!r} has no published version {version}")

    def change(current: dict | None) -> dict:
        history = list((current or {}).get("history", []))
        if current and "version" in current and current["version"] != version:
            history.append(current["version"])
        return {"version": version, "history": history[-HISTORY_LIMIT:], "reason": reason}

    return _move(storage, registry_uri, name, alias, change)


def rollback(storage: Storage, registry_uri: str, name: str, alias: str = "production") -> dict:
    """Moves `alias` back to the version it pointed to before."""

    def change(current: dict | None) -> dict:
        if not current or not current.get("history"):
            raise BundleError(
                f"alias {alias!r} of model {name!r} has no earlier version to roll back to"
            )
        history = list(current["history"])
        previous = history.pop()
        return {
            "version": previous,
            "history": history,
            "reason": f"rollback from {current['version']}",
        }

    return _move(storage, registry_uri, name, alias, change)
