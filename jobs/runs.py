"""Runs: every pipeline run writes under `<storage>/runs/<run id>/`; its ids and pointers."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from jobs.storage import Storage, join


def new_run_id() -> str:
    """Sortable by time, unique across processes and within a second."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + f"-{uuid.uuid4().hex[:8]}"


def latest_model(storage: Storage, run_uri: str) -> str:
    """The model the run's latest training wrote (named by `train/_result.json`)."""
    return storage.read_json(join(run_uri, "train", "_result.json"))["model_uri"]
