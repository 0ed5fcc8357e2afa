"""Signatures over state that will be unpickled: an HMAC-SHA256 over every file of a folder.

Ray Tune's experiment state (`tuner.pkl`, trial and searcher state) is pickled; unpickling runs
code. A plain checksum stored next to that state would be rewritten by whoever can rewrite the
state, so the digest is keyed: HMAC-SHA256 with a key that lives only where the driver runs.

The key is `RAYLINE_SIGNING_KEY` if set, else the contents of a per-user key file
(`~/.config/rayline/signing_key`, or `RAYLINE_SIGNING_KEY_FILE`), created with 0600 permissions
on first use. The signature (relative path -> SHA-256 of content, plus the HMAC over that sorted
list) is a JSON object written next to the folder, read and written through `Storage` so the
folder may be on s3://. Paths are relative, so a signed folder may be moved or copied.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path

import pyarrow.fs as pafs

from jobs.errors import RaylineError, StorageError
from jobs.storage import Storage

KEY_ENV = "RAYLINE_SIGNING_KEY"
KEY_FILE_ENV = "RAYLINE_SIGNING_KEY_FILE"
DEFAULT_KEY_FILE = "~/.config/rayline/signing_key"
ALGORITHM = "HMAC-SHA256 over sorted [relative path, SHA-256] pairs, rayline-signature-v1"
_DOMAIN = b"rayline-signature-v1\n"
_CHUNK = 1 << 20


class SigningKeyError(RaylineError, ValueError):
    """The signing key cannot be read or created, or its file is readable by others."""


def key_file() -> Path:
    return Path(os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE).expanduser()


def signing_key() -> bytes:
    """The HMAC key: `RAYLINE_SIGNING_KEY`, else the key file (created on first use, 0600)."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode()
    path = key_file()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            pass
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
    try:
        mode = path.stat().st_mode
        key = path.read_text().strip()
    except OSError as error:
        raise SigningKeyError(f"cannot read the signing key {path}: {error}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningKeyError(
            f"signing key {path} is accessible by other users (mode {stat.filemode(mode)}); "
            f"run `chmod 600 {path}`"
        )
    if not key:
        raise SigningKeyError(f"signing key {path} is empty; delete it to create a new one")
    return key.encode()


def key_id(key: bytes) -> str:
    """A short public name for a key, to tell which key signed what (reveals nothing of it)."""
    return hashlib.sha256(b"rayline-key-id\n" + key).hexdigest()[:12]


def file_digests(storage: Storage, uri: str) -> dict[str, str]:
    """Relative path -> SHA-256 for every file under `uri`, hidden ones included; {} if absent."""
    fs, root = storage.filesystem(uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return {}
    digests = {}
    for item in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if item.type != pafs.FileType.File:
            continue
        digest = hashlib.sha256()
        try:
            with fs.open_input_stream(item.path) as stream:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
        except OSError as error:
            raise StorageError(f"cannot read {item.path} to sign it: {error}") from None
        digests[item.path[len(root) :].lstrip("/")] = digest.hexdigest()
    return digests


def _mac(key: bytes, digests: dict[str, str]) -> str:
    listing = json.dumps(sorted(digests.items()), separators=(",", ":")).encode()
    return hmac.new(key, _DOMAIN + listing, hashlib.sha256).hexdigest()


def sign_tree(storage: Storage, uri: str, signature_uri: str) -> dict:
    """Digests every file under `uri` and writes the signed listing to `signature_uri`."""
    key = signing_key()
    digests = file_digests(storage, uri)
    signature = {
        "algorithm": ALGORITHM,
        "key_id": key_id(key),
        "files": digests,
        "hmac": _mac(key, digests),
    }
    storage.write_json(signature_uri, signature)
    return signature


def _printable(text: str) -> str:
    """Names from storage go into a one-line error: no newlines or escapes from a writer."""
    return text if text.isprintable() else repr(text)


def _names(paths: set[str], limit: int = 3) -> str:
    shown = [_printable(p) for p in sorted(paths)[:limit]]
    more = f" (+{len(paths) - limit} more)" if len(paths) > limit else ""
    return ", ".join(shown) + more


def verify_tree(storage: Storage, uri: str, signature_uri: str) -> str | None:
    """None when the files under `uri` are exactly those signed; else what differs, one line.

    The signature itself is authenticated first, so a listing rewritten together with the
    files is reported as such; nothing under `uri` is interpreted, only hashed.
    """
    if not storage.exists(signature_uri):
        return f"no signature {signature_uri}"
    try:
        signature = storage.read_json(signature_uri)
        digests, mac = signature["files"], signature["hmac"]
        if not (
            isinstance(mac, str)
            and isinstance(digests, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items())
        ):
            raise TypeError("unexpected types")
    except (ValueError, KeyError, TypeError) as error:
        return f"unreadable signature {signature_uri} ({type(error).__name__})"
    key = signing_key()
    if not hmac.compare_digest(_mac(key, digests), mac):
        return (
            f"signature {signature_uri} is not valid for this signing key (signed with key "
            f"{_printable(str(signature.get('key_id', '?'))[:12])}, this key is {key_id(key)})"
        )
    actual = file_digests(storage, uri)
    changed = {p for p in digests.keys() & actual.keys() if digests[p] != actual[p]}
    added, removed = actual.keys() - digests.keys(), digests.keys() - actual.keys()
    problems = [
        f"{what}: {_names(paths)}"
        for what, paths in (("changed", changed), ("added", added), ("removed", removed))
        if paths
    ]
    return "; ".join(problems) or None
