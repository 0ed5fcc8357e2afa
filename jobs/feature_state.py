"""Online feature state: per-entity history and window state in Redis.

Every event a stream worker applies updates its entity's state; the stream scorer, the Serve
endpoint and batch inference read it in one round trip. The values come out of the same
definitions as the batch features (`jobs.featurespec`): the running amount sum is added one
event at a time as polars' `cum_sum` adds it, and window sums use `math.fsum`, so an event
replayed in order gets bitwise the features the batch point-in-time join gave it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import redis

from jobs.featurespec import window_start, window_value


@dataclass
class EntityState:
    """What one entity's earlier events leave behind (the batch history, incrementally)."""

    count: int = 0
    total: float = 0.0  # polars' cum_sum starts from 0.0 too
    last: int | None = None  # event time (epoch seconds) of the latest event applied
    last_id: str = ""
    recent: list[list] = field(default_factory=list)  # [seconds, amount], oldest first
    closed: dict[str, int] = field(default_factory=dict)  # tumbling window -> last emitted start

    def encode(self) -> str:
        """One JSON value per entity (read for a whole batch with one MGET); JSON writes a
        float as its `repr`, which round-trips it exactly."""
        fields = [self.count, self.total, self.last, self.last_id, self.recent, self.closed]
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def decode(cls, value) -> EntityState:
        """From the stored value (None for an entity never seen, or expired)."""
        if value is None:
            return cls()
        count, total, last, last_id, recent, closed = json.loads(value)
        return cls(int(count), float(total), last, str(last_id), recent, dict(closed))

    def copy(self) -> EntityState:
        return EntityState(
            self.count, self.total, self.last, self.last_id, list(self.recent), dict(self.closed)
        )


@dataclass
class Step:
    """Per-row prior state (what the features read) for one batch, and what it changes."""

    count: np.ndarray
    total: np.ndarray
    last: np.ndarray
    windows: dict[str, np.ndarray]
    late: list[int] = field(default_factory=list)  # rows older than the allowed lateness
    updated: dict = field(default_factory=dict)  # entity -> EntityState after the batch
    closed: list[dict] = field(default_factory=list)  # tumbling windows that ended


class FeatureState:
    """The Redis side of the online state for one config (keys under `prefix`)."""

    def __init__(self, client: redis.Redis, prefix: str, features, stream):
        self.client, self.prefix = client, prefix
        self.windows = dict(features.windows)
        self.lateness = stream.allowed_lateness_s if stream else 0
        self.ttl = stream.state_ttl_s if stream else 30 * 86400
        sizes = [w.seconds for w in self.windows.values()]
        self.keep = (max(sizes) if sizes else 0) + self.lateness

    def key(self, entity) -> str:
        return f"{self.prefix}:state:{entity}"

    def read(self, entities) -> dict:
        """entity -> EntityState for the distinct entities, in one round trip (MGET)."""
        distinct = list(dict.fromkeys(e for e in entities if e is not None))
        values = self.client.mget([self.key(e) for e in distinct]) if distinct else []
        return {e: EntityState.decode(v) for e, v in zip(distinct, values, strict=True)}

    def write(self, pipe, updated: dict, closed_to: str | None = None, closed=()) -> None:
        """Queues the changed states (each with its TTL) and ended windows on `pipe`."""
        for entity, state in updated.items():
            pipe.set(self.key(entity), state.encode(), ex=self.ttl)
        for record in closed if closed_to else ():
            pipe.xadd(closed_to, {"window": json.dumps(record)}, maxlen=1_000_000, approximate=True)

    def step(self, states: dict, entities, amounts, seconds, ids, usable, advance: bool) -> Step:
        """Features' prior state for each row in order; with `advance`, each usable row is then
        applied, so a later row of the same entity sees it (the stream). Without, every row
        reads the stored state (Serve, batch inference)."""
        n = len(entities)
        out = Step(np.zeros(n), np.full(n, np.nan), np.full(n, np.nan), {})
        values = {name: np.full(n, np.nan) for name in self.windows}
        current = {}
        for row in range(n):
            entity = entities[row]
            if entity is None or not usable[row]:
                continue
            state = current.get(entity) or states.get(entity) or EntityState()
            moment = None if seconds[row] is None else int(seconds[row])
            stale = moment is not None and state.last is not None
            if advance and stale and moment < state.last - self.lateness:
                out.late.append(row)
                continue
            out.count[row] = state.count
            out.total[row] = state.total if state.count else np.nan
            out.last[row] = np.nan if state.last is None else state.last
            if moment is not None:
                for name, window in self.windows.items():
                    begin = window_start(window.kind, moment, window.seconds)
                    sliding = window.kind == "sliding"
                    inside = [
                        a for t, a in state.recent if (t > begin if sliding else t >= begin)
                        and t <= moment
                    ]  # fmt: skip
                    values[name][row] = window_value(window.agg, inside)
            if advance:
                amount = amounts[row]
                amount = 0.0 if amount is None or math.isnan(amount) else float(amount)
                state = self._apply(state.copy(), entity, moment, amount, ids[row], out.closed)
                current[entity] = state
        out.windows, out.updated = values, current
        return out

    def _apply(self, state, entity, moment, amount, event_id, closed: list) -> EntityState:
        if moment is not None:
            self._close_changed(state, entity, moment, closed)
        state.count += 1
        state.total = state.total + amount
        if moment is not None:
            state.last = moment if state.last is None else max(state.last, moment)
            if self.keep:
                state.recent.append([moment, amount])
                state.recent.sort(key=lambda pair: pair[0])  # stable: ties keep arrival order
                cutoff = state.last - self.keep
                state.recent = [pair for pair in state.recent if pair[0] > cutoff]
        state.last_id = str(event_id)
        return state

    def _close_changed(self, state: EntityState, entity, moment: int, closed: list) -> None:
        """A tumbling window ends when its entity's next event falls in a later bucket."""
        if state.last is None:
            return
        for name, window in self.windows.items():
            if window.kind == "tumbling":
                begin = window_start("tumbling", state.last, window.seconds)
                if moment >= begin + window.seconds and state.closed.get(name) != begin:
                    closed.append(self.window_record(state, entity, name, begin))

    def window_record(self, state: EntityState, entity, name: str, begin: int) -> dict:
        """One ended tumbling window's aggregates, marked emitted on the state."""
        size = self.windows[name].seconds
        amounts = [a for t, a in state.recent if begin <= t < begin + size]
        state.closed[name] = begin
        return {
            "entity": entity,
            "window": name,
            "start": begin,
            "end": begin + size,
            "count": len(amounts),
            "sum": math.fsum(amounts),
            "mean": math.fsum(amounts) / len(amounts) if amounts else None,
        }

    def close_idle(self, state: EntityState, entity) -> list[dict]:
        """Ends the open tumbling windows of an entity that has gone quiet (wall clock)."""
        if state.last is None:
            return []
        records = []
        for name, window in self.windows.items():
            begin = window_start("tumbling", state.last, window.seconds)
            if window.kind == "tumbling" and state.closed.get(name) != begin:
                records.append(self.window_record(state, entity, name, begin))
        return records


def bootstrap(state: FeatureState, table, features, key_column: str | None, chunk=50_000) -> int:
    """Applies historical events (e.g. a run's ingested table) in (event time, key) order and
    writes the result: the online state a stream would have left after those events."""
    import pyarrow as pa
    import pyarrow.compute as pc

    history = features.history
    sort_keys = [(features.timestamp, "ascending")]
    if key_column:
        sort_keys.append((key_column, "ascending"))
    table = table.sort_by(sort_keys)
    stamps = pc.cast(pc.cast(table.column(features.timestamp), pa.timestamp("s")), pa.int64())
    seconds = stamps.to_pylist()
    entities = table.column(history.entity).to_pylist()
    amounts = pc.cast(table.column(history.amount), pa.float64()).to_pylist()
    ids = table.column(key_column).to_pylist() if key_column else list(range(table.num_rows))
    usable = [s is not None for s in seconds]
    states: dict = {}
    for start in range(0, table.num_rows, chunk):
        window = slice(start, start + chunk)
        step = state.step(
            states, entities[window], amounts[window], seconds[window], ids[window],
            usable[window], advance=True,
        )  # fmt: skip
        states.update(step.updated)
    for names in _batched(list(states), 5000):
        pipe = state.client.pipeline(transaction=False)
        state.write(pipe, {name: states[name] for name in names})
        pipe.execute()
    return table.num_rows


def _batched(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
