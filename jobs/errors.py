"""Error types for bad input, at the bottom of the import stack.

Every stage raises one of these with a message naming the key path, source, file, URI or
version; the entry point (`jobs.entrypoint.run_cli`) turns them into one line and exit code 2.
Nothing here imports anything else from `jobs`.
"""

from __future__ import annotations

from collections.abc import Iterator


class RaylineError(Exception):
    """Base of every error an entry point reports as one line (bad input, not a bug)."""


class ConfigError(RaylineError, ValueError):
    """A configuration problem, with the key path and what was expected."""


class StorageError(RaylineError, OSError):
    """A storage operation failed; the message names the URI."""


class SourceError(RaylineError, ValueError):
    """A source is missing or unusable; the message names it."""


class SchemaError(RaylineError, ValueError):
    """A source cannot be mapped to its declared schema; names the source and column."""


class TrainingError(RaylineError, ValueError):
    """Training cannot start or finish; the message says what is wrong."""


class BundleError(RaylineError, ValueError):
    """A bundle or alias is missing, incomplete or fails its checksums."""


class StreamError(RaylineError):
    """The broker cannot be reached or a stream is not what rayline expects."""


class ConflictError(RaylineError):
    """A concurrent writer won a race (a version folder or an alias); the caller may retry."""


def causes(error: BaseException | None, depth: int = 5) -> Iterator[BaseException]:
    """`error` and what caused it, also across Ray: a RayTaskError carries the task's own
    exception as `.cause`."""
    for _ in range(depth):
        if error is None:
            return
        yield error
        cause = getattr(error, "cause", None)
        error = cause if isinstance(cause, BaseException) else error.__cause__
