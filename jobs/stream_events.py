"""Events as the stream workers see them: parsed messages (or why they cannot be), the
outcome of a batch, and the score fields per task."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import redis

from jobs.stream_keys import StreamKeys

LEASE_MS = 15_000  # a partition's owner renews its lease every second; a stalled one loses it
# Take the lease if it is free, renew it if it is ours: 1; someone else holds it: 0.
LEASE = """
local holder = redis.call('GET', KEYS[1])
if not holder or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class Event:
    stream: str
    message_id: str
    record: dict | None
    reason: str | None = None  # why it cannot be scored (malformed, poison)
    enqueued_at: float | None = None
    deliveries: int = 1
    raw: bytes | None = None  # the `record` field as it came, when it did not parse


@dataclass
class Outcome:
    """What one batch did, for the worker's counters."""

    scored: int = 0
    dead: int = 0
    late: int = 0
    duplicates: int = 0
    pending: int = 0  # failed, left for another delivery
    latencies: list[float] = field(default_factory=list)


def ensure_groups(client: redis.Redis, keys: StreamKeys, group: str) -> None:
    """Creates the consumer group on every partition (from the start of the stream)."""
    for stream in keys.all_events():
        try:
            client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise


def parse_event(
    stream: str, message_id, fields: dict | None, deliveries: int = 1, limit: int = 65536
) -> Event:
    """A message as an event, or an event with the reason it is malformed."""
    message_id = message_id.decode() if isinstance(message_id, bytes) else str(message_id)
    if fields is None:
        return Event(stream, message_id, None, "message was deleted from the stream", None)
    fields = {k.decode("utf-8", "replace") if isinstance(k, bytes) else k: v
              for k, v in fields.items()}  # fmt: skip
    enqueued = fields.get("enqueued_at")
    try:
        enqueued = float(enqueued) if enqueued is not None else None
    except ValueError:
        enqueued = None
    event = Event(stream, message_id, None, None, enqueued, deliveries)
    raw = fields.get("record")
    if raw is None:
        event.reason = "no `record` field"
        return event
    event.raw = raw if isinstance(raw, bytes) else str(raw).encode()
    if len(event.raw) > limit:
        event.reason, event.raw = f"record: larger than {limit} bytes", event.raw[:limit]
        return event
    try:
        record = json.loads(event.raw)
    except RecursionError:
        event.reason = "record: JSON nested too deeply"
        return event
    except ValueError as error:  # JSON errors and bad UTF-8 alike
        event.reason = f"record: not JSON ({str(error)[:120]})"
        return event
    if not isinstance(record, dict):
        event.reason = "record: not a JSON object"
        return event
    event.record = record
    return event


def dead_letter(event: Event) -> dict:
    """A dead or late event's entry: where it came from, why, and the record as it came."""
    if event.record is not None:
        record = json.dumps(event.record, default=str)
    else:
        record = (event.raw or b"").decode("utf-8", "backslashreplace")
    return {
        "stream": event.stream,
        "id": event.message_id,
        "reason": event.reason or "late: older than the customer's last event",
        "record": record,
        "deliveries": event.deliveries,
    }


def decision(score, spec, threshold) -> dict:
    """The score fields per task, as the HTTP API answers them."""
    if spec.task == "binary":
        return {"score": repr(float(score)), "label": int(score >= threshold)}
    if spec.task == "multiclass":
        best = int(np.argmax(score))
        return {"score": json.dumps([float(p) for p in score]), "label": spec.classes[best]}
    return {"score": repr(float(score)), "label": ""}


def undelivered(client: redis.Redis, stream: str, info: dict) -> int:
    """XINFO GROUPS' `lag` of one group, counted from its last delivered id where Redis
    cannot tell (after a restart or a trim it reports none)."""
    if info.get("lag") is not None:
        return int(info["lag"])
    last = info["last-delivered-id"]
    last = last.decode() if isinstance(last, bytes) else last
    return len(client.xrange(stream, min=f"({last}", count=1_000_000))
