"""Run identifiers: every pipeline run writes under `<storage>/runs/<run id>/`."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone


def new_run_id() -> str:
    """Sortable by time, unique across processes and within a second."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + f"-{uuid.uuid4().hex[:8]}"
