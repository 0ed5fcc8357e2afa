"""Version folders of the registry: where they live, which are published, and claiming one.

A publisher first claims the next free folder by creating `versions/<NNNNNN>/_claim.json`
with an exclusive create (put-if-absent); only the winner writes into that folder, a loser
tries the next number. A folder counts as a published version only once its manifest (written
last) exists, so a claimed folder whose publisher died is skipped, never reused.
"""

from __future__ import annotations

import json
import os
import platform
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from jobs.errors import ConflictError
from jobs.storage import Storage, join

MANIFEST = "manifest.json"
CLAIM = "_claim.json"
MAX_CLAIM_ATTEMPTS = 1000


@dataclass(frozen=True)
class Claim:
    """A won claim: the version folder now belongs to `owner`; `data` is the claim file."""

    version: int
    owner: str
    data: bytes


def version_dir(registry_uri: str, name: str, version: int) -> str:
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


def highest_folder(storage: Storage, registry_uri: str, name: str) -> int:
    """The highest version number with a folder (claimed, half-written or published), or 0."""
    folders = storage.list_dirs(join(registry_uri, name, "versions"))
    return max((int(f) for f in folders if f.isdigit()), default=0)


def claim_version(storage: Storage, registry_uri: str, name: str, run_uri: str = "") -> Claim:
    """Claims the next free version folder for this publisher.

    The claim file is written with `Storage.create_exclusive`, so of two publishers racing
    for number N exactly one gets it; the other takes N+1 and never writes into N.
    """
    version = highest_folder(storage, registry_uri, name) + 1
    claim = {
        "owner": uuid.uuid4().hex,
        "host": platform.node(),
        "pid": os.getpid(),
        "run_uri": run_uri,
        "claimed": datetime.now(timezone.utc).isoformat(),
    }
    for _ in range(MAX_CLAIM_ATTEMPTS):
        claim["version"] = version
        data = json.dumps(claim, indent=2, sort_keys=True).encode()
        if storage.create_exclusive(join(version_dir(registry_uri, name, version), CLAIM), data):
            return Claim(version, claim["owner"], data)
        version += 1
    raise ConflictError(
        f"model {name!r}: no free version folder under {registry_uri} after "
        f"{MAX_CLAIM_ATTEMPTS} attempts"
    )
