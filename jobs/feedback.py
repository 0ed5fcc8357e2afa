"""Feedback: labels that arrive later, joined to the predictions made earlier; live quality
over a window of labelled predictions; score drift; and retraining through `ray job submit`.

Labels arrive on `keys.labels`, one field `record` per message: a JSON object with the fact
source's primary key and the label column. `FeedbackJoiner` reads them with its own consumer
group and joins each to the prediction hash the stream workers left for that key. Every label
ends in exactly one place, written in one MULTI/EXEC with its acknowledgement:
- joined: a JSON pair on the list `keys.feedback` (newest first, capped at `feedback.window`);
- unmatched (no prediction: expired or never scored): the stream `<prefix>:unmatched`;
- malformed: the dead-letter stream `keys.dead`, with a reason naming the field.
Counters `labels_joined`, `labels_unmatched`, `labels_dead` go to the hash `keys.stats`.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import redis

from jobs.retrain import maybe_retrain, text
from jobs.stream_events import LEASE, LEASE_MS
from jobs.stream_keys import StreamKeys

GROUP = "feedback"
BINARY = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


def unmatched_stream(keys: StreamKeys) -> str:
    return f"{keys.prefix}:unmatched"


class FeedbackJoiner:
    """Joins labels to predictions; at-least-once reading, exactly-once effect per message."""

    def __init__(self, config, client: redis.Redis, consumer: str = "feedback-0"):
        self.keys = StreamKeys.of(config)
        self.client, self.consumer = client, consumer
        self.window = config.stream.feedback.window
        self.batch_size = config.stream.batch_size
        self.claim_idle_ms = config.stream.claim_idle_ms
        self.key_column = config.sources[config.fact].primary_key
        self.label_column = config.features.label
        self.binary = config.task == "binary"
        label_map = getattr(config.features, "label_map", None)
        self.label_values = label_map.mapping() if label_map is not None else None
        self.label_wait_s = config.stream.feedback.label_wait_s
        self._cursor: str | None = "0"  # re-read this consumer's pending messages first
        self._retry_at: float | None = None  # labels waiting for their prediction
        try:
            client.xgroup_create(self.keys.labels, GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def read(self, block_ms: int = 0) -> list[tuple[str, dict]]:
        """The next batch: this consumer's pending messages (after a restart), then messages
        idle too long at a dead consumer, then new ones."""
        if self._cursor is None and self._retry_at and time.monotonic() >= self._retry_at:
            self._cursor, self._retry_at = "0", None  # labels that wait get another look
        if self._cursor is not None:  # the pending list, once through, from a cursor
            reply = self.client.xreadgroup(
                GROUP, self.consumer, {self.keys.labels: self._cursor}, count=self.batch_size
            )
            messages = reply[0][1] if reply else []
            if messages:
                self._cursor = text(messages[-1][0])
                return [(text(i), f or {}) for i, f in messages]
            self._cursor = None
        claimed = self.client.xautoclaim(
            self.keys.labels, GROUP, self.consumer, self.claim_idle_ms, "0-0", self.batch_size
        )
        if claimed[1]:
            return [(text(i), f or {}) for i, f in claimed[1]]
        reply = self.client.xreadgroup(
            GROUP, self.consumer, {self.keys.labels: ">"}, count=self.batch_size,
            block=block_ms or None,
        )  # fmt: skip
        return [(text(i), f or {}) for i, f in reply[0][1]] if reply else []

    def poll(self, block_ms: int = 0) -> int:
        """Reads and handles one batch; returns the number of label messages handled."""
        messages = self.read(block_ms)
        if messages:
            self.handle(messages)
        return len(messages)

    def parse(self, fields: dict) -> tuple[str, object]:
        """(key, label) of one message; raises ValueError naming the field at fault."""
        fields = {text(k): text(v) for k, v in fields.items()}
        if "record" not in fields:
            raise ValueError("field 'record' is missing (message deleted or not a label)")
        try:
            record = json.loads(fields["record"])
        except RecursionError:
            raise ValueError("field 'record' is JSON nested too deeply") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"field 'record' is not JSON: {error}") from None
        if not isinstance(record, dict):
            raise ValueError(f"field 'record' is a JSON {type(record).__name__}, not an object")
        key, label = record.get(self.key_column), record.get(self.label_column)
        if key is None or key == "" or isinstance(key, dict | list):
            raise ValueError(f"record field {self.key_column!r} (the key) is missing or empty")
        if label is None or isinstance(label, dict | list):
            raise ValueError(f"record field {self.label_column!r} (the label) is missing")
        normalized = str(label).strip().lower()
        if self.label_values is not None and normalized in self.label_values:
            return str(key), self.label_values[normalized]
        if self.binary:
            if isinstance(label, bool):
                return str(key), int(label)
            if normalized not in BINARY:
                raise ValueError(f"record field {self.label_column!r}: {label!r} is not 0/1")
            return str(key), BINARY[normalized]
        if self.label_values is not None:
            raise ValueError(f"record field {self.label_column!r}: unknown value {label!r}")
        return str(key), label

    def handle(self, messages: list[tuple[str, dict]]) -> dict:
        """Joins, writes and acknowledges one batch in one transaction; returns the counts."""
        keys, parsed, dead = self.keys, [], []
        for message_id, fields in messages:
            try:
                parsed.append((message_id, fields, *self.parse(fields)))
            except ValueError as error:
                dead.append((message_id, fields, str(error)))
        lookup = self.client.pipeline(transaction=False)
        for _, _, key, _ in parsed:
            lookup.get(keys.prediction(key))
        predictions = [json.loads(v) if v else {} for v in lookup.execute()] if parsed else []
        now = time.time()
        counts = {"labels_joined": 0, "labels_unmatched": 0, "labels_dead": len(dead)}
        tx = self.client.pipeline(transaction=True)
        waiting = set()
        for (message_id, fields, key, label), found in zip(parsed, predictions, strict=True):
            found = {text(k): text(v) for k, v in found.items()}
            record = text(fields.get(b"record", fields.get("record", "")))
            sent_at = int(message_id.split("-")[0]) / 1000  # the stream id's milliseconds
            if (not found or "score" not in found) and now - sent_at < self.label_wait_s:
                waiting.add(message_id)  # its event may not be scored yet: stays pending
                continue
            if not found or "score" not in found:
                reason = f"no prediction for {self.key_column}={key!r} (expired or never scored)"
                tx.xadd(
                    unmatched_stream(keys),
                    {"id": message_id, "key": key, "record": record, "reason": reason},
                )
                counts["labels_unmatched"] += 1
                continue
            pair = {
                "key": key, "score": _number(found["score"]), "label": label,
                "decision": _number(found.get("label")), "model": found.get("model", ""),
                "version": found.get("version", ""), "at": _number(found.get("at")),
                "labelled_at": now, "id": message_id,
            }  # fmt: skip
            tx.lpush(keys.feedback, json.dumps(pair))
            counts["labels_joined"] += 1
        for message_id, fields, reason in dead:
            payload = {text(k): text(v) for k, v in fields.items()}
            tx.xadd(
                keys.dead,
                {"stream": keys.labels, "id": message_id, "reason": reason,
                 "payload": json.dumps(payload)},
            )  # fmt: skip
        if counts["labels_joined"]:
            tx.ltrim(keys.feedback, 0, self.window - 1)
        for field, value in counts.items():
            if value:
                tx.hincrby(keys.stats, field, value)
        done = [message_id for message_id, _ in messages if message_id not in waiting]
        if done:
            tx.xack(keys.labels, GROUP, *done)
        tx.execute()
        if waiting:
            self._retry_at = self._retry_at or time.monotonic() + 1.0
        counts["labels_waiting"] = len(waiting)
        return counts


def _number(value):
    """A stored number as int or float, a JSON list (class probabilities) as a list."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        return json.loads(value) if value.startswith("[") else value
    return int(number) if number.is_integer() else number


def feedback_pairs(client: redis.Redis, keys: StreamKeys, window: int | None = None) -> list:
    """The joined pairs on `keys.feedback`, newest first (at most `window`)."""
    end = -1 if window is None else window - 1
    return [json.loads(item) for item in client.lrange(keys.feedback, 0, end)]


def live_quality(
    client: redis.Redis | None,
    keys: StreamKeys | None,
    task: str = "binary",
    window: int | None = None,
    pairs: list | None = None,
) -> dict:
    """Quality over the window of labelled predictions: n, positives, precision and recall of
    the stored 0/1 decisions, and PR-AUC of the scores (`average_precision_score`); the
    ratios are None until both classes (or any positive decision, for precision) are present.
    Binary tasks only: other tasks get n and a note."""
    from sklearn.metrics import average_precision_score, precision_score, recall_score

    pairs = feedback_pairs(client, keys, window) if pairs is None else pairs
    result = {"n": len(pairs), "positives": None, "precision": None, "recall": None}
    result["pr_auc"] = None
    if task != "binary":
        result["note"] = f"live precision/recall/PR-AUC are computed for binary tasks, not {task}"
        return result
    labels = np.asarray([int(p["label"]) for p in pairs], dtype=np.int64)
    scores = np.asarray([float(p["score"]) for p in pairs], dtype=np.float64)
    decisions = [p.get("decision") for p in pairs]
    result["positives"] = int(labels.sum())
    if len(set(labels.tolist())) == 2:
        result["pr_auc"] = float(average_precision_score(labels, scores))
        if all(d in (0, 1) for d in decisions):
            made = np.asarray(decisions, dtype=np.int64)
            if made.any():
                result["precision"] = float(precision_score(labels, made))
            result["recall"] = float(recall_score(labels, made))
    return result


def latest_scores(
    client: redis.Redis, keys: StreamKeys, count: int, version: str | None = None
) -> np.ndarray:
    """The newest `count` scores on `keys.scores` (of one model version, if given)."""
    scores = []
    for _, fields in client.xrevrange(keys.scores, count=count):
        fields = {text(k): text(v) for k, v in fields.items()}
        if version is not None and fields.get("version") != str(version):
            continue
        try:
            score = _number(fields["score"])  # multiclass: the first class's probability
            scores.append(float(score[0] if isinstance(score, list) else score))
        except (KeyError, ValueError):
            continue
    return np.asarray(scores, dtype=np.float64)


def score_psi(
    client: redis.Redis,
    keys: StreamKeys,
    reference: dict | None,
    window: int,
    version: str | None = None,
    minimum: int = 1,
) -> float | None:
    """PSI (jobs.drift) of the latest scores against a bundle's `reference.json` score bins;
    None without a score reference or with fewer than `minimum` scores."""
    from jobs.drift import psi

    if not reference or not reference.get("score"):
        return None
    scores = latest_scores(client, keys, window, version)
    return psi(reference["score"], scores) if scores.size >= max(minimum, 1) else None


def production_reference(config) -> tuple[str, str, dict | None]:
    """(model, version, reference.json) of the bundle the stream scores with."""
    from jobs.registry import load_bundle
    from jobs.storage import Storage, join

    bundle = load_bundle(
        Storage(config.s3), join(config.storage, "registry"), config.name, config.stream.alias
    )
    return config.name, str(bundle.version), bundle.reference


def run_feedback(
    config,
    client: redis.Redis,
    root: str,
    config_path: str,
    block_ms: int = 1000,
    check_every_s: float = 10.0,
    reference_loader=None,
    stop=None,
) -> None:
    """The feedback loop: join labels as they arrive; every `check_every_s` judge quality and
    score drift of the version currently scoring, and retrain when due. `stop()` ends it."""
    keys, feedback = StreamKeys.of(config), config.stream.feedback
    joiner = FeedbackJoiner(config, client)
    loader = reference_loader or (lambda: production_reference(config))
    next_check, said = 0.0, None
    owner = f"feedback:{os.getpid()}:{id(joiner)}"
    while not (stop and stop()):
        try:
            # One joiner per config: a second `stream run` waits for the lease.
            if not client.eval(LEASE, 1, keys.lease("feedback"), owner, LEASE_MS):
                time.sleep(block_ms / 1000)
                continue
            joiner.poll(block_ms)
            if time.monotonic() < next_check:
                continue
            next_check = time.monotonic() + check_every_s
            try:
                _, version, reference = loader()
            except Exception as error:  # no bundle yet: judge all pairs, no score PSI
                version, reference = None, None
                message = f"feedback: no bundle to compare scores with: {error}"
                if message != said:
                    print(message)
                    said = message
            pairs = feedback_pairs(client, keys, feedback.window)
            pairs = [p for p in pairs if version is None or str(p.get("version")) == version]
            quality = live_quality(None, None, config.task, pairs=pairs)
            drift = score_psi(
                client, keys, reference, feedback.window, version, feedback.min_labels
            )
            maybe_retrain(config, quality, drift, client, root, config_path)
        except redis.ConnectionError as error:  # broker restart: resume from the pending list
            print(f"feedback: Redis unavailable ({error}); retrying in 1 s")
            joiner._cursor = "0"
            time.sleep(1.0)
        except Exception as error:  # noqa: BLE001 - the loop outlives any one batch
            message = f"feedback: {type(error).__name__}: {error}"
            if message != said:
                print(message)
                said = message
            time.sleep(1.0)
