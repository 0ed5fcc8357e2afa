"""Progress bars on the console (rich) for long stages, fed by the driver or by Ray tasks.

A driver waits on Ray object refs with `track_refs` (files read, folds done), or on one long
task with `follow`, which polls a small `ProgressBoard` actor that the task (or Ray Train
workers) update, e.g. with the boosting round and the current validation metric.
Progress goes to stderr, so stdout keeps only results; it is off when `RAYLINE_QUIET=1`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import ray
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

progress_console = Console(stderr=True)


def quiet() -> bool:
    return os.environ.get("RAYLINE_QUIET", "") not in ("", "0")


@contextmanager
def bar(description: str, total: float | None = None) -> Iterator[Callable[..., None]]:
    """A progress bar; yields `update(completed=None, advance=0, status="")`."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=progress_console, disable=quiet()) as progress:
        task = progress.add_task(description, total=total, status="")

        def update(completed: float | None = None, advance: float = 0, status: str = "") -> None:
            fields = {"status": status} if status else {}
            if completed is not None:
                progress.update(task, completed=completed, **fields)
            else:
                progress.update(task, advance=advance, **fields)

        yield update


def track_refs(refs: list, description: str) -> None:
    """Waits for every ref (without fetching the values), advancing a bar as each finishes."""
    pending = list(refs)
    with bar(description, total=len(pending)) as update:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0, fetch_local=False)
            if done:
                update(advance=len(done))


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest progress reported by remote code: completed units and a status line."""

    def __init__(self):
        self.completed, self.status = 0.0, ""

    def report(self, completed: float, status: str = "") -> None:
        self.completed, self.status = completed, status

    def read(self) -> tuple[float, str]:
        return self.completed, self.status


def follow(ref, board, description: str, total: float | None, poll_s: float = 0.5):
    """Waits for one long task while showing what it reports to `board`; returns its value."""
    with bar(description, total=total) as update:
        while not ray.wait([ref], timeout=poll_s, fetch_local=False)[0]:
            completed, status = ray.get(board.read.remote())
            update(completed=completed, status=status)
        value = ray.get(ref)
        completed, status = ray.get(board.read.remote())
        update(completed=completed, status=status)
    return value
