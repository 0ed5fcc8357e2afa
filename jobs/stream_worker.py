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

from jobs.feature_state import FeatureState
from jobs.registry import load_bundle, resolve
from jobs.storage import Storage, join
from jobs.stream_events import (
    LEASE,
    LEASE_MS,
    RELEASE,
    Event,
    Outcome,
    dead_letter,
    ensure_groups,
    parse_event,
)
from jobs.stream_keys import StreamKeys
from jobs.stream_scoring import BatchScorer

CONSUMER = "worker"


class LostLease(Exception):
    """Another worker owns the partition now: the batch is left to it, unacknowledged."""


class StreamWorker:
    """Owns some partitions; `run` loops until `stop`. Used as a Ray actor by `jobs.stream`
    (threaded, so `assign` and `stop` reach it while `run` loops) and in-process by tests."""

    def __init__(self, config, partitions: list[int] | None = None, client=None):
        self.config, self.stream = config, config.stream
        self.keys = StreamKeys.of(config)
        self.client = client or redis.Redis.from_url(
            self.stream.redis_url, socket_timeout=30, socket_connect_timeout=10
        )  # a broker that stops answering is an error, not a hang
        ensure_groups(self.client, self.keys, self.stream.group)
        self.storage = Storage(config.s3)
        self.registry_uri = join(config.storage, "registry")
        self.partitions = list(partitions or [])
        self._wanted: list[int] | None = None
        self._applied = threading.Event()
        self._stopping = threading.Event()
        self._checked_at = self._beat_at = self._swept_at = self._claimed_at = 0.0
        self._pending: set[int] = set()  # partitions whose pending list comes first
        self.leased: set[int] = set()
        self.owner = _owner_id()
        self._leased_at = 0.0
        self.totals = Outcome()
        self._running = False
        self.errors = 0
        self.last_error = ""
        self.scorer = None  # jobs.online.OnlineScorer of the bundle being followed
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
                except LostLease:
                    self._leased_at = 0.0  # find out what it still owns before reading more
                except Exception as error:  # noqa: BLE001 - the loop must outlive any batch
                    self.errors += 1
                    broker = isinstance(error, redis.RedisError)
                    self.last_error = f"{'broker' if broker else type(error).__name__}: {error}"
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
            features = bundle.spec.features  # the model's windows, not the config's
            self.state = FeatureState(self.client, self.keys.prefix, features, self.stream)
            self.batch = BatchScorer(bundle, self.state, self.stream)
            self.scorer = self.batch.scorer
            self.windows = any(w.kind == "tumbling" for w in features.windows.values())
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
        if time.monotonic() - self._claimed_at > max(1.0, self.stream.claim_idle_ms / 2000):
            self._claimed_at = time.monotonic()
            for partition in sorted(self.leased):
                self._claim(self.keys.events(partition))
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
            waiting = self.client.xpending_range(
                stream, group, "-", "+", count, consumername=CONSUMER
            )
            if not waiting:
                self._pending.discard(partition)
                self._claim(stream)
                continue
            # Read again once already, still not acknowledged: one at a time, so the event
            # that keeps killing its worker is the only one whose deliveries add up.
            size = 1 if any(row["times_delivered"] >= 2 for row in waiting) else count
            replies = self.client.xreadgroup(group, CONSUMER, {stream: "0"}, count=size)
            times = {row["message_id"]: row["times_delivered"] + 1 for row in waiting}
            limit = self.stream.max_record_bytes
            for mid, fields in replies[0][1] if replies else []:
                events.append(parse_event(stream, mid, fields, times.get(mid, 2), limit))
        if events:
            return events
        streams = {self.keys.events(p): ">" for p in sorted(self.leased)}
        replies = self.client.xreadgroup(
            group, CONSUMER, streams, count=count, block=self.stream.block_ms
        )
        for stream, entries in replies or []:
            stream = stream.decode() if isinstance(stream, bytes) else stream
            limit = self.stream.max_record_bytes
            events += [parse_event(stream, mid, f, 1, limit) for mid, f in entries]
        return events

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
        """Scores a batch and commits it; a batch that raises is retried event by event, so
        one poison event ends in the dead letters and its neighbours are scored. A customer's
        later events wait behind its failed one (they would otherwise overtake it)."""
        limit = self.stream.max_deliveries
        for event in events:
            if event.reason is None and event.deliveries > limit:
                event.reason = f"delivered {event.deliveries} times without being handled"
        try:
            return self._commit(events)
        except (redis.RedisError, LostLease):
            raise  # the whole batch comes back: nothing was written
        except Exception as error:  # noqa: BLE001 - isolate the event that fails
            self.last_error = f"{type(error).__name__}: {error}"
        outcome, failed = Outcome(), set()
        for event in events:
            entity = str(self.batch.entity(event))
            try:
                part = Outcome(pending=1) if entity in failed else self._commit([event])
            except (redis.RedisError, LostLease):
                raise
            except Exception as error:  # noqa: BLE001
                if event.deliveries < limit:
                    part = Outcome(pending=1)
                    failed.add(entity)
                else:
                    failure = f"{type(error).__name__}: {error}"
                    event.reason = f"failed {event.deliveries} times: {failure}"
                    part = self._commit([event])
            if part.pending:  # left pending: the next read of its partition retries it
                self._pending.add(_partition(event.stream))
            for name in ("scored", "dead", "late", "duplicates", "pending"):
                setattr(outcome, name, getattr(outcome, name) + getattr(part, name))
            outcome.latencies += part.latencies
        return outcome

    def _commit(self, events: list[Event]) -> Outcome:
        """Scores and writes a batch in one transaction that only commits while this worker
        still holds the partitions' leases and nobody else marked these events done."""
        by_partition: dict[int, list[Event]] = {}
        for event in events:
            by_partition.setdefault(_partition(event.stream), []).append(event)
        with self.client.pipeline(transaction=True) as pipe:
            leases = [self.keys.lease(p) for p in by_partition]
            pipe.watch(*leases, *[self.keys.done(p) for p in by_partition])
            if any(pipe.get(lease) != self.owner.encode() for lease in leases):
                raise LostLease
            fresh, duplicates = self._fresh(pipe, by_partition)
            outcome = Outcome(duplicates=duplicates)
            dead = [e for e in fresh if e.reason is not None]
            batch = self.batch.score([e for e in fresh if e.reason is None])
            dead += batch.dead
            now = time.time()
            pipe.multi()
            if batch.step is not None:
                step = batch.step
                self.state.write(pipe, step.updated, self.keys.windows, step.closed)
                for entity in step.updated if self.windows else ():
                    partition = self.keys.partition(entity)
                    pipe.zadd(self.keys.open_windows(partition), {str(entity): now})
            for event, entry in batch.entries:
                pipe.xadd(
                    self.keys.scores, entry, maxlen=self.stream.output_stream_maxlen,
                    approximate=True,
                )  # fmt: skip
                if entry["key"]:
                    kept = {k: entry[k] for k in ("score", "label", "model", "version")}
                    pipe.set(
                        self.keys.prediction(entry["key"]), json.dumps(kept | {"at": now}),
                        ex=self.stream.prediction_ttl_s,
                    )  # fmt: skip
                if event.enqueued_at:
                    outcome.latencies.append(now - event.enqueued_at)
            for stream_key, items in ((self.keys.dead, dead), (self.keys.late, batch.late)):
                for event in items:
                    pipe.xadd(stream_key, dead_letter(event), maxlen=1_000_000, approximate=True)
            for partition, items in by_partition.items():
                pipe.zadd(self.keys.done(partition), {e.message_id: now for e in items})
            counts = {"events": len(events), "scored": len(batch.entries), "dead": len(dead)}
            counts |= {"late": len(batch.late), "duplicates": duplicates}
            for name, value in counts.items():
                if value:
                    pipe.hincrby(self.keys.stats, name, value)
            for partition, items in by_partition.items():
                pipe.xack(self.keys.events(partition), self.stream.group,
                          *[e.message_id for e in items])  # fmt: skip
            try:
                pipe.execute()
            except redis.WatchError:
                raise LostLease from None
        outcome.scored, outcome.dead, outcome.late = len(batch.entries), len(dead), len(batch.late)
        for name in ("scored", "dead", "late", "duplicates"):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(outcome, name))
        return outcome

    def _fresh(self, pipe, by_partition: dict) -> tuple[list[Event], int]:
        """Events neither handled before (by message id) nor already scored under the same
        primary key (a record sent twice), and how many were left out."""
        seen = set()
        for partition, items in by_partition.items():
            found = pipe.zmscore(self.keys.done(partition), [e.message_id for e in items])
            seen |= {e.message_id for e, when in zip(items, found, strict=True) if when}
        events = [e for items in by_partition.values() for e in items]
        key_column = self.batch.key_column
        keyed = {}
        for event in events:
            if key_column and isinstance(event.record, dict) and event.reason is None:
                key = event.record.get(key_column)
                if isinstance(key, str | int) and not isinstance(key, bool):
                    keyed.setdefault(str(key), []).append(event)
        if keyed:
            scored = pipe.mget([self.keys.prediction(k) for k in keyed])
            for items, before in zip(keyed.values(), scored, strict=True):
                seen |= {e.message_id for e in (items if before else items[1:])}
        fresh = [e for e in events if e.message_id not in seen]
        return fresh, len(events) - len(fresh)


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
