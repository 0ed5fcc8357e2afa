"""The top of the stack for every command: bad input becomes one line and exit code 2.

Console scripts, `python -m jobs.<stage>` and the driver of `ray job submit` all go through
`run_cli`, so a typo in a config prints `error: <what, where>` instead of a traceback.
"""

from __future__ import annotations

import sys

import typer

from jobs.errors import RaylineError, causes


def bad_input(error: BaseException) -> RaylineError | None:
    """The rayline error behind `error`, also when it was raised inside a Ray task."""
    return next(
        (
            found
            for found in causes(error)
            if isinstance(found, RaylineError)
            and not type(found).__name__.startswith("RayTaskError")
        ),
        None,
    )


def one_line(message: str) -> str:
    """A multi-line message (a config with several bad keys, a YAML error with its marks) as
    one line: a heading that ends in ':' keeps its colon, the items are joined with '; '."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) < 2:
        return lines[0] if lines else ""
    if lines[0].endswith(":"):
        return f"{lines[0]} {'; '.join(lines[1:])}"
    return "; ".join(lines)


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
        print(f"error: {one_line(str(found)) or type(found).__name__}", file=sys.stderr)
        sys.exit(2)
