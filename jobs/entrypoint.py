"""The top of the stack for every command: bad input becomes one line and exit code 2.

Console scripts, `python -m jobs.<stage>` and the driver of `ray job submit` all go through
`run_cli`, so a typo in a config prints `error: <what, where>` instead of a traceback.
"""

from __future__ import annotations

import sys

import typer

from jobs.errors import RaylineError


def bad_input(error: BaseException) -> RaylineError | None:
    """The rayline error behind `error`, also when it was raised inside a Ray task."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, RaylineError) and not type(error).__name__.startswith("RayTaskError"):
            return error
        cause = getattr(error, "cause", None)  # RayTaskError carries the task's exception
        error = cause if isinstance(cause, BaseException) else error.__cause__
        seen += 1
    return None


def run_cli(command) -> None:
    """Runs a typer command or app; bad input exits 2 with one line naming what is wrong."""
    try:
        if isinstance(command, typer.Typer):
            command(standalone_mode=True)
        else:
            typer.run(command)
    except Exception as error:  # noqa: BLE001 - anything else is a bug and keeps its traceback
        found = bad_input(error)
        if found is None:
            raise
        message = str(found).strip() or type(found).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
