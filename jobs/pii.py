"""The secret key that hashes PII columns, from the environment variable the config names."""

from __future__ import annotations

import os
import warnings

from jobs.config import Config
from jobs.errors import ConfigError

DEMO_PII_KEY = b"rayline-demo-key-not-for-production"


def pii_key(config: Config) -> bytes:
    """The HMAC key for PII columns, from the environment variable the config names."""
    if not any(source.pii for source in config.sources.values()):
        return DEMO_PII_KEY  # nothing to hash: no secret needed
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
