"""Where a stage's time went, lap by lap."""

from __future__ import annotations

import time


class Stopwatch:
    """Records the seconds between laps into a dict, so a report can say where time went."""

    def __init__(self, into: dict):
        self.into, self.last = into, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.into[name] = round(self.into.get(name, 0.0) + now - self.last, 3)
        self.last = now
