"""Redis key names of one config's streaming side, shared by workers, replay and feedback.

Events are spread over `stream.partitions` streams by a stable hash of the entity, so every
event of an entity lands on one stream, is read by one worker, and is applied in order.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class StreamKeys:
    prefix: str
    partitions: int

    @classmethod
    def of(cls, config) -> StreamKeys:
        stream = config.stream
        return cls(stream.prefix or f"rayline:{config.name}", stream.partitions)

    def events(self, partition: int) -> str:
        return f"{self.prefix}:events:{partition}"

    def partition(self, entity) -> int:
        """A stable partition: crc32 of the entity's text (Python's hash() is salted)."""
        return 0 if entity is None else zlib.crc32(str(entity).encode()) % self.partitions

    def all_events(self) -> list[str]:
        return [self.events(p) for p in range(self.partitions)]

    @property
    def scores(self) -> str:  # one entry per scored event, field `id` = its event message id
        return f"{self.prefix}:scores"

    @property
    def dead(self) -> str:  # malformed or poison events, with the reason
        return f"{self.prefix}:dead"

    @property
    def late(self) -> str:  # events older than the entity's last event - allowed lateness
        return f"{self.prefix}:late"

    @property
    def windows(self) -> str:  # ended tumbling windows per entity
        return f"{self.prefix}:windows"

    @property
    def labels(self) -> str:  # labels that arrive later: {"record": {<key>: ..., <label>: ...}}
        return f"{self.prefix}:labels"

    @property
    def stats(self) -> str:  # counters: events, scored, dead, late, duplicates, labels_*
        return f"{self.prefix}:stats"

    def done(self, partition: int) -> str:
        """Sorted set of a partition's handled events (message id -> when): a redelivered
        event finds itself here and is only acknowledged. Trimmed after `prediction_ttl_s`."""
        return f"{self.prefix}:done:{partition}"

    def prediction(self, key) -> str:
        """The prediction of the record with this primary key (JSON: score, label, model,
        version, at), for joining its label."""
        return f"{self.prefix}:pred:{key}"

    def lease(self, partition: int) -> str:
        """Who owns a partition now (a worker id, with an expiry)."""
        return f"{self.prefix}:lease:{partition}"

    def open_windows(self, partition: int) -> str:
        """Sorted set: entity -> wall-clock time of its latest event, for idle windows."""
        return f"{self.prefix}:open:{partition}"

    @property
    def feedback(self) -> str:  # list of joined (score, label) JSON, newest first, capped
        return f"{self.prefix}:feedback"

    @property
    def retrain(self) -> str:  # hash: last retraining submission (time, job id, reason)
        return f"{self.prefix}:retrain"

    @property
    def workers(self) -> str:  # hash: worker pid -> {"partitions", "at"} (a heartbeat)
        return f"{self.prefix}:workers"

    @property
    def sink_cursor(self) -> str:  # the last scores-stream id written to storage
        return f"{self.prefix}:sink"
