"""Bearer tokens with scopes (`predict`, `admin`), read from an env var or a secret file.

Tokens never come from the config (only where to find them) and are never logged: only their
SHA-256 digests are kept, and a presented token is compared with every known digest in
constant time (`hmac.compare_digest`, no early exit), so timing does not tell how close a guess
was. The entry format is `scopes:token`, e.g. `predict:abc… admin,predict:def…`, separated by
whitespace or newlines; `#` starts a comment line in the file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from jobs.errors import ConfigError
from jobs.serve_config import AuthConfig

SCOPES = ("predict", "admin")
MIN_TOKEN_LENGTH = 8


class AuthFailure(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_entries(text: str, where: str) -> dict[bytes, frozenset[str]]:
    """Digest -> scopes. Errors name the entry's position and `where`, never the token."""
    tokens: dict[bytes, frozenset[str]] = {}
    entries = [
        word
        for line in text.splitlines()
        if not line.lstrip().startswith("#")
        for word in line.split()
    ]
    for number, entry in enumerate(entries, start=1):
        scopes_text, sep, token = entry.partition(":")
        scopes = frozenset(s for s in scopes_text.split(",") if s)
        if not sep or not scopes or not token:
            raise ConfigError(f"{where}: entry {number} is not 'scopes:token'")
        unknown = sorted(scopes - set(SCOPES))
        if unknown:
            raise ConfigError(f"{where}: entry {number} has unknown scope(s) {unknown}")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"{where}: entry {number}: token shorter than {MIN_TOKEN_LENGTH} characters"
            )
        tokens[_digest(token)] = tokens.get(_digest(token), frozenset()) | scopes
    return tokens


def _read_secret_file(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"serve.auth.tokens_file: no such file {path}")
    if file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"serve.auth.tokens_file: {path} is readable by others; run: chmod 600 {path}"
        )
    return file.read_text()


@dataclass(frozen=True)
class Authenticator:
    tokens: dict[bytes, frozenset[str]]
    enabled: bool = True

    @classmethod
    def from_config(cls, auth: AuthConfig) -> Authenticator:
        if auth.local_demo_no_auth:
            return cls({}, enabled=False)
        tokens = parse_entries(os.environ.get(auth.tokens_env, ""), f"env {auth.tokens_env}")
        if auth.tokens_file:
            tokens.update(parse_entries(_read_secret_file(auth.tokens_file), auth.tokens_file))
        if not tokens:
            raise ConfigError(
                f"serve.auth: no tokens; set {auth.tokens_env} (e.g. 'predict:<token>') or "
                "serve.auth.tokens_file, or serve.auth.local_demo_no_auth: true on loopback"
            )
        return cls(tokens)

    def check(self, authorization: str | None, scope: str) -> None:
        """Raises AuthFailure: 401 without a valid bearer token, 403 without the scope."""
        if not self.enabled:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthFailure(401, "missing bearer token (Authorization: Bearer <token>)")
        presented = _digest(token.strip())
        granted: frozenset[str] = frozenset()
        for digest, scopes in self.tokens.items():  # no early exit: constant time
            if hmac.compare_digest(presented, digest):
                granted = scopes
        if not granted:
            raise AuthFailure(401, "invalid bearer token")
        if scope not in granted:
            raise AuthFailure(403, f"this token lacks the {scope!r} scope")
