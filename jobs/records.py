"""One raw record's contract, built from the bundle's FeatureSpec: what the HTTP endpoint and
the stream workers both accept (strict types, named fields, timestamps as naive UTC)."""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    create_model,
)

from jobs.featurespec import FeatureSpec, online_source


def _utc(value: datetime) -> datetime:
    """Aware timestamps become naive UTC here, so a date beyond year 9999 in UTC is a 422."""
    if value.tzinfo is None:
        return value
    try:
        return value.astimezone(timezone.utc).replace(tzinfo=None)
    except OverflowError:
        raise ValueError("timestamp is out of range once converted to UTC") from None


EXACT = 2**53  # model inputs are floats: larger integers would not be what the model sees
PYTHON_TYPES = {
    # Strict: `true` is not an id or a number, and "5" is not an integer (422, naming the
    # field). Ids often arrive as numbers; they are compared as strings.
    "string": Annotated[StrictStr, Field(max_length=1000)]
    | Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)],
    "int64": Annotated[int, Field(strict=True, ge=-EXACT, le=EXACT)],
    # NaN, ±Infinity and numbers too large for a double (which JSON parsing turns into
    # infinity) are 422, naming the field, never a score.
    "float64": Annotated[float, Field(allow_inf_nan=False, strict=True)],
    "bool": StrictBool,
    "timestamp": Annotated[datetime, AfterValidator(_utc)],
    "date": date,
}


def record_model(spec: FeatureSpec) -> type[BaseModel]:
    """A pydantic model of one raw record, built from the fact source's declared types."""
    source = online_source(spec.source, spec.features.label)
    required = {rule.column for rule in source.rules if rule.check == "not_null"}
    fields: dict[str, Any] = {}
    for column, kind in source.types.items():
        python = PYTHON_TYPES[kind]
        if column in required and column != source.primary_key:
            fields[column] = (python, Field(...))
        else:
            fields[column] = (python | None, Field(None))
    return create_model("Record", __config__=ConfigDict(extra="forbid"), **fields)
