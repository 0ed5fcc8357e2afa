"""Scoring one batch of stream events: the HTTP endpoint's record contract, online features
from the state (applied event by event), the model, and one score entry per event.

Kept apart from the worker's reading and committing (`jobs.stream_worker`) so both stay
readable; one `BatchScorer` exists per loaded bundle."""

from __future__ import annotations

import json
import time
from calendar import timegm
from dataclasses import dataclass, field

from pydantic import ValidationError

from jobs.feature_state import FeatureState
from jobs.online import OnlineScorer
from jobs.records import record_model
from jobs.registry import Bundle
from jobs.stream_events import Event, decision


@dataclass
class Scored:
    entries: list = field(default_factory=list)  # (event, score entry)
    dead: list = field(default_factory=list)  # events with a reason
    late: list = field(default_factory=list)
    step: object = None  # jobs.feature_state.Step: the state changes to write


def _where(error: ValidationError) -> str:
    """`field: message` of the first error; pydantic's type tags (`constrained-str`,
    `int`) are left out of the location."""
    first = error.errors()[0]
    parts = [str(p) for p in first.get("loc", ()) if not str(p).endswith(("-str", "-int"))]
    parts = [p for p in parts if p not in ("str", "int", "float", "bool", "datetime", "date")]
    return f"{'.'.join(parts) or 'record'}: {first.get('msg', 'invalid')}"


class BatchScorer:
    def __init__(self, bundle: Bundle, state: FeatureState, stream):
        self.bundle, self.spec, self.state, self.stream = bundle, bundle.spec, state, stream
        self.scorer = OnlineScorer(bundle)
        self.record_model = record_model(bundle.spec)
        self.history = self.spec.features.history is not None
        self.key_column = self.spec.source.primary_key
        self.entity_column = self.spec.features.history.entity if self.history else None
        self.timestamp = self.spec.features.timestamp

    def entity(self, event: Event):
        """The raw entity of an event (what it is partitioned and ordered by)."""
        return (
            None
            if not self.entity_column or not event.record
            else event.record.get(self.entity_column)
        )

    def score(self, events: list[Event]) -> Scored:
        """Events without a reason in, each one scored, late or dead (with a reason) out."""
        out = Scored()
        records, typed = [], []
        horizon = time.time() + self.stream.max_future_s
        for event in events:  # the HTTP endpoint's record contract: types, names, UTC
            try:
                record = self.record_model.model_validate(event.record).model_dump()
            except ValidationError as error:
                event.reason = _where(error)
                out.dead.append(event)
                continue
            moment = record.get(self.timestamp) if self.timestamp else None
            if hasattr(moment, "timetuple") and timegm(moment.timetuple()) > horizon:
                event.reason = (
                    f"{self.timestamp}: more than {self.stream.max_future_s} s in the future"
                )
                out.dead.append(event)
                continue
            records.append(record)
            typed.append(event)
        if not typed:
            return out
        steps: list = []

        def prior(entities, amounts, seconds, null_time, reasons):
            usable = [r is None and not t for r, t in zip(reasons, null_time, strict=True)]
            states = self.state.read(entities)
            ids = [f"{e.stream}/{e.message_id}" for e in typed]
            seconds = [None if t else int(s) for s, t in zip(seconds, null_time, strict=True)]
            step = self.state.step(states, entities, amounts, seconds, ids, usable, advance=True)
            steps[:] = [step]
            return {"count": step.count, "total": step.total, "last": step.last,
                    "windows": step.windows}  # fmt: skip

        matrix, reasons = self.scorer.features(records, state=prior if self.history else None)
        scores = self.scorer.scores_for(matrix, reasons)
        out.step = steps[0] if steps else None
        late = set(out.step.late) if out.step else set()
        for row, event in enumerate(typed):
            if reasons[row] is not None:
                event.reason = reasons[row]
                out.dead.append(event)
            elif row in late:
                out.late.append(event)
            else:
                out.entries.append((event, self.entry(event, scores[row], matrix[row])))
        return out

    def entry(self, event: Event, score, features) -> dict:
        record, bundle = event.record, self.bundle
        entry = {
            "id": event.message_id,
            "stream": event.stream,
            "key": "" if not self.key_column else str(record.get(self.key_column, "")),
            "entity": "" if not self.entity_column else str(record.get(self.entity_column)),
            "model": bundle.name,
            "version": bundle.version,
            "event_time": str(record.get(self.timestamp or "", "")),
            "scored_at": time.time(),
            "enqueued_at": event.enqueued_at or "",
        }
        entry |= decision(score, self.spec, bundle.threshold)
        if self.stream.emit_features:  # float32 values, exact in JSON
            entry["features"] = json.dumps(features.tolist())
        return entry
