"""One stream worker: reads its partitions' events from Redis Streams, scores them with the
production bundle on the online feature state, and writes everything back in one transaction.

Delivery is at least once, the effect exactly once: a batch's scores, state updates, dead
letters, `done` markers and acknowledgements commit together (MULTI/EXEC), and an event that
comes back after a crash finds its `done` marker and is only acknowledged. Each partition is
read under one consumer name (`worker`) by whichever worker owns it, so a new owner resumes
from the pending list the old one left; `XAUTOCLAIM` takes over what other consumers left idle.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

import redis
from pydantic import ValidationError

from jobs.feature_state import FeatureState
from jobs.online import OnlineScorer
from jobs.records import record_model
from jobs.registry import load_bundle, resolve
from jobs.storage import Storage, join
from jobs.stream_events import (
    LEASE,
    LEASE_MS,
    RELEASE,
    Event,
    Outcome,
    decision,
    ensure_groups,
    parse_event,
)
from jobs.stream_keys import StreamKeys

CONSUMER = "worker"


class StreamWorker:
    """Owns some partitions; `run` loops until `stop`. Used as a Ray actor by `jobs.stream`
    (threaded, so `assign` and `stop` reach it while `run` loops) and in-process by tests."""

    def __init__(self, config, partitions: list[int] | None = None, client=None):
        self.config, self.stream = config, config.stream
        self.keys = StreamKeys.of(config)
        self.client = client or redis.Redis.from_url(self.stream.redis_url)
        ensure_groups(self.client, self.keys, self.stream.group)
        self.storage = Storage(config.s3)
        self.registry_uri = join(config.storage, "registry")
        self.partitions = list(partitions or [])
        self._wanted: list[int] | None = None
        self._applied = threading.Event()
        self._stopping = threading.Event()
        self._checked_at = self._beat_at = self._swept_at = 0.0
        self._pending: set[int] = set()  # partitions whose pending list comes first
        self.leased: set[int] = set()
        self.owner = _owner_id()
        self._leased_at = 0.0
        self.totals = Outcome()
        self._running = False
        self.errors = 0
        self.last_error = ""
        self.scorer: OnlineScorer | None = None
        self._load_model()

    # ------------------------------------------------------------------ control
    def assign(self, partitions: list[int], timeout: float = 30.0) -> list[int]:
        """New partitions, applied between batches; returns once the loop has taken them."""
        self._applied.clear()
        self._wanted = list(partitions)
        if not self._running:
            self._take_assignment()
        self._applied.wait(timeout)
        return self.partitions

    def _take_assignment(self) -> None:
        if self._wanted is not None:
            dropped = set(self.partitions) - set(self._wanted)
            self.partitions, self._wanted = self._wanted, None
            self._release(dropped)
            self._renew_leases()
            self._applied.set()

    def _renew_leases(self) -> None:
        """Reads only the partitions whose lease it holds: a second `rayline stream run` on
        the same config, or an owner that stalled, cannot make two owners of one partition."""
        pipe = self.client.pipeline(transaction=False)
        for partition in self.partitions:
            pipe.eval(LEASE, 1, self.keys.lease(partition), self.owner, LEASE_MS)
        held = {p for p, ok in zip(self.partitions, pipe.execute(), strict=True) if ok}
        self._pending |= held - self.leased  # a new owner reads what the last one left first
        self._pending &= held
        self.leased = held
        self._leased_at = time.monotonic()

    def _release(self, partitions) -> None:
        for partition in partitions:
            self.client.eval(RELEASE, 1, self.keys.lease(partition), self.owner)
        self.leased -= set(partitions)
        self._pending -= set(partitions)

    def stop(self) -> dict:
        self._stopping.set()
        return self.counters()

    def counters(self) -> dict:
        t = self.totals
        return {
            "partitions": self.partitions,
            "scored": t.scored,
            "dead": t.dead,
            "late": t.late,
            "duplicates": t.duplicates,
            "errors": self.errors,
            "last_error": self.last_error,
            "version": self.scorer.bundle.version if self.scorer else None,
        }

    def run(self, seconds: float | None = None) -> dict:
        """Polls until `stop` (or `seconds`); a lost broker is retried with backoff."""
        self._running = True
        deadline = None if seconds is None else time.monotonic() + seconds
        backoff = 0.1
        try:
            while not self._stopping.is_set():
                if deadline is not None and time.monotonic() > deadline:
                    break
                self._take_assignment()
                try:
                    self.poll()
                    backoff = 0.1
                except (redis.ConnectionError, redis.TimeoutError) as error:
                    self.errors += 1
                    self.last_error = f"broker unreachable: {error}"
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            self._running = False
            self._take_assignment()
            with contextlib.suppress(redis.RedisError):  # the next owner need not wait
                self._release(set(self.leased))
        return self.counters()

    # ------------------------------------------------------------------ model
    def _load_model(self) -> None:
        """Follows the configured alias (every `refresh_s`): a promotion reaches the stream."""
        version = resolve(self.storage, self.registry_uri, self.config.name, self.stream.alias)
        if self.scorer is None or self.scorer.bundle.version != version:
            bundle = load_bundle(self.storage, self.registry_uri, self.config.name, version)
            self.scorer = OnlineScorer(bundle)
            features = bundle.spec.features  # the model's windows, not the config's
            self.state = FeatureState(self.client, self.keys.prefix, features, self.stream)
            self.windows = any(w.kind == "tumbling" for w in features.windows.values())
            self._record_model = record_model(bundle.spec)
        self._checked_at = time.monotonic()

    def close_idle_windows(self) -> None:
        """Ends the tumbling windows of entities with no event for `window_idle_s` of wall
        clock (a quiet key would otherwise hold its window open until its next event)."""
        if time.monotonic() - self._swept_at < min(1.0, self.stream.window_idle_s):
            return
        self._swept_at = time.monotonic()
        cutoff = time.time() - self.stream.window_idle_s
        for partition in sorted(self.leased):
            key = self.keys.open_windows(partition)
            idle = [e.decode() for e in self.client.zrangebyscore(key, "-inf", cutoff, 0, 1000)]
            if not idle:
                continue
            states, changed, records = self.state.read(idle), {}, []
            for entity in idle:
                ended = self.state.close_idle(states[entity], entity)
                if ended:
                    records += ended
                    changed[entity] = states[entity]
            pipe = self.client.pipeline(transaction=True)
            self.state.write(pipe, changed, self.keys.windows, records)
            pipe.zrem(key, *idle)
            pipe.execute()

    def _heartbeat(self) -> None:
        """Who owns what, for `rayline stream status` and for tests that kill a worker."""
        beat = {"partitions": self.partitions, "at": time.time()}
        self.client.hset(self.keys.workers, str(os.getpid()), json.dumps(beat))
        forget = time.time() - self.stream.prediction_ttl_s
        for partition in self.leased:  # done markers live as long as predictions
            self.client.zremrangebyscore(self.keys.done(partition), "-inf", forget)
        self._beat_at = time.monotonic()

    # ------------------------------------------------------------------ reading
    def poll(self) -> Outcome:
        """One read of every owned partition (pending first), one batch scored and committed."""
        if time.monotonic() - self._checked_at > self.stream.refresh_s:
            self._load_model()
        if time.monotonic() - self._beat_at > 1.0:
            self._heartbeat()
        if time.monotonic() - self._leased_at > 1.0:
            self._renew_leases()
        if not self.leased:
            time.sleep(self.stream.block_ms / 1000)
            return Outcome()
        events = self._read()
        outcome = self.handle(events) if events else Outcome()
        if self.windows:
            self.close_idle_windows()
        return outcome

    def _read(self) -> list[Event]:
        group, count = self.stream.group, self.stream.batch_size
        events = []
        for partition in sorted(self._pending):
            stream = self.keys.events(partition)
            replies = self.client.xreadgroup(group, CONSUMER, {stream: "0"}, count=count)
            entries = replies[0][1] if replies else []
            if not entries:
                self._pending.discard(partition)
                self._claim(stream)
                continue
            deliveries = self._deliveries(stream, entries)
            events += [parse_event(stream, mid, f, deliveries.get(mid, 1)) for mid, f in entries]
        if events:
            return events
        streams = {self.keys.events(p): ">" for p in sorted(self.leased)}
        replies = self.client.xreadgroup(
            group, CONSUMER, streams, count=count, block=self.stream.block_ms
        )
        for stream, entries in replies or []:
            stream = stream.decode() if isinstance(stream, bytes) else stream
            events += [parse_event(stream, mid, f) for mid, f in entries]
        return events

    def _deliveries(self, stream: str, entries: list) -> dict:
        ids = [mid for mid, _ in entries]
        rows = self.client.xpending_range(
            stream, self.stream.group, min=ids[0], max=ids[-1], count=len(ids) * 2
        )
        return {row["message_id"]: row["times_delivered"] for row in rows}

    def _claim(self, stream: str) -> None:
        """Takes over messages other consumers left idle; they come back as pending."""
        partition = int(stream.rsplit(":", 1)[-1])
        claimed = self.client.xautoclaim(
            stream, self.stream.group, CONSUMER, self.stream.claim_idle_ms, "0-0", count=1000
        )
        if claimed and claimed[1]:
            self._pending.add(partition)

    # ------------------------------------------------------------------ handling
    def handle(self, events: list[Event]) -> Outcome:
        """Scores a batch and commits it; a batch that fails is retried event by event, so
        one poison event ends in the dead letters and its neighbours are scored."""
        limit = self.stream.max_deliveries
        for event in events:
            if event.reason is None and event.deliveries > limit:
                event.reason = f"delivered {event.deliveries} times without being handled"
        try:
            return self._commit(events)
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except Exception as error:  # noqa: BLE001 - isolate the event that fails
            self.last_error = f"{type(error).__name__}: {error}"
        outcome = Outcome()
        for event in events:
            try:
                part = self._commit([event])
            except (redis.ConnectionError, redis.TimeoutError):
                raise
            except Exception as error:  # noqa: BLE001
                if event.deliveries >= limit:
                    event.reason = (
                        f"failed {event.deliveries} times: {type(error).__name__}: {error}"
                    )
                    part = self._commit([event])
                else:  # left pending: the next read of its partition retries it
                    part = Outcome(pending=1)
                    self._pending.add(_partition(event.stream))
            for name in ("scored", "dead", "late", "duplicates", "pending"):
                setattr(outcome, name, getattr(outcome, name) + getattr(part, name))
            outcome.latencies += part.latencies
        return outcome

    def _commit(self, events: list[Event]) -> Outcome:
        by_partition: dict[int, list[Event]] = {}
        for event in events:
            by_partition.setdefault(_partition(event.stream), []).append(event)
        check = self.client.pipeline(transaction=False)
        for partition, items in by_partition.items():
            check.zmscore(self.keys.done(partition), [e.message_id for e in items])
        seen = {
            e.message_id
            for items, found in zip(by_partition.values(), check.execute(), strict=True)
            for e, when in zip(items, found, strict=True)
            if when is not None
        }
        fresh = [e for e in events if e.message_id not in seen]
        valid = [e for e in fresh if e.reason is None]
        dead = [e for e in fresh if e.reason is not None]
        outcome = Outcome(duplicates=len(events) - len(fresh))
        scored, late, reasons, step, invalid = self._score(valid)
        dead += invalid
        valid = [e for e in valid if e.reason is None]
        for event, reason in zip(valid, reasons, strict=True):
            if reason is not None:
                event.reason = reason
                dead.append(event)
        late_events = [valid[i] for i in late]
        pipe = self.client.pipeline(transaction=True)
        now = time.time()
        if step is not None:
            self.state.write(pipe, step.updated, self.keys.windows, step.closed)
            for entity in step.updated if self.windows else ():
                partition = self.keys.partition(entity)
                pipe.zadd(self.keys.open_windows(partition), {str(entity): now})
        for event, entry in scored:
            pipe.xadd(
                self.keys.scores, entry, maxlen=self.stream.output_stream_maxlen, approximate=True
            )
            if entry["key"]:
                kept = {k: entry[k] for k in ("score", "label", "model", "version")}
                pipe.set(
                    self.keys.prediction(entry["key"]), json.dumps(kept | {"at": now}),
                    ex=self.stream.prediction_ttl_s,
                )  # fmt: skip
            if event.enqueued_at:
                outcome.latencies.append(now - event.enqueued_at)
        for stream_key, items in ((self.keys.dead, dead), (self.keys.late, late_events)):
            for event in items:
                pipe.xadd(stream_key, {
                    "stream": event.stream, "id": event.message_id,
                    "reason": event.reason or "late: older than the entity's last event",
                    "record": json.dumps(event.record, default=str),
                    "deliveries": event.deliveries,
                }, maxlen=1_000_000, approximate=True)  # fmt: skip
        for partition, items in by_partition.items():
            pipe.zadd(self.keys.done(partition), {e.message_id: now for e in items})
        counts = {"events": len(events), "scored": len(scored), "dead": len(dead)}
        counts |= {"late": len(late_events), "duplicates": outcome.duplicates}
        for name, value in counts.items():
            if value:
                pipe.hincrby(self.keys.stats, name, value)
        by_stream: dict[str, list[str]] = {}
        for event in events:
            by_stream.setdefault(event.stream, []).append(event.message_id)
        for stream_key, ids in by_stream.items():
            pipe.xack(stream_key, self.stream.group, *ids)
        pipe.execute()
        outcome.scored, outcome.dead, outcome.late = len(scored), len(dead), len(late_events)
        for name in ("scored", "dead", "late", "duplicates"):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(outcome, name))
        return outcome

    def _score(self, events: list[Event]):
        """(event, score entry) for scored events, late row indexes, per-row reasons, step."""
        if not events:
            return [], [], [], None, []
        scorer = self.scorer
        records, typed = [], []
        for event in events:  # the HTTP endpoint's record contract: types, names, UTC
            try:
                records.append(self._record_model.model_validate(event.record).model_dump())
                typed.append(event)
            except ValidationError as error:
                first = error.errors()[0]
                where = ".".join(str(part) for part in first.get("loc", ())) or "record"
                event.reason = f"{where}: {first.get('msg', 'invalid')}"
        if len(typed) < len(events):
            invalid = [e for e in events if e.reason is not None]
            scored, late, reasons, step, _ = self._score(typed)
            return scored, late, reasons, step, invalid
        events = typed
        steps: list = []

        def prior(entities, amounts, seconds, null_time, reasons):
            usable = [r is None and not t for r, t in zip(reasons, null_time, strict=True)]
            states = self.state.read(entities)
            ids = [f"{e.stream}/{e.message_id}" for e in events]
            seconds = [None if t else int(s) for s, t in zip(seconds, null_time, strict=True)]
            step = self.state.step(states, entities, amounts, seconds, ids, usable, advance=True)
            steps[:] = [step]
            return {"count": step.count, "total": step.total, "last": step.last,
                    "windows": step.windows}  # fmt: skip

        history = scorer.spec.features.history is not None
        matrix, reasons = scorer.features(records, state=prior if history else None)
        scores = scorer.scores_for(matrix, reasons)
        step = steps[0] if steps else None
        late = set(step.late) if step else set()
        bundle, spec = scorer.bundle, scorer.spec
        key_column = spec.source.primary_key
        entity_column = spec.features.history.entity if history else None
        scored = []
        for row, event in enumerate(events):
            if reasons[row] is not None or row in late:
                continue
            score = scores[row]
            entry = {
                "id": event.message_id,
                "stream": event.stream,
                "key": "" if not key_column else str(event.record.get(key_column, "")),
                "entity": "" if not entity_column else str(event.record.get(entity_column)),
                "model": bundle.name,
                "version": bundle.version,
                "event_time": str(event.record.get(spec.features.timestamp or "", "")),
                "scored_at": time.time(),
                "enqueued_at": event.enqueued_at or "",
            }
            entry |= decision(score, spec, bundle.threshold)
            if self.stream.emit_features:  # float32 values, exact in JSON
                entry["features"] = json.dumps(matrix[row].tolist())
            scored.append((event, entry))
        return scored, sorted(late), reasons, step, []


def _owner_id() -> str:
    """The actor's id when it runs as a Ray actor (kept across restarts, so a restarted worker
    takes its leases back at once), else this process."""
    try:
        import ray

        actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside Ray
        actor = None
    here = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return f"actor:{actor}" if actor else here


def _partition(stream: str) -> int:
    return int(stream.rsplit(":", 1)[-1])
