"""The HTTP contract: request models generated from the bundle's FeatureSpec, strict parsing and
4xx answers that name the field without echoing values.

The body is parsed here rather than by FastAPI so that a duplicate JSON key (which `json.loads`
would silently resolve to the last value) is a 400, and the size limit is enforced before
parsing. OpenAPI at /docs still shows the exact record fields (`openapi_components`).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
)

from jobs.featurespec import FeatureSpec
from jobs.records import EXACT, PYTHON_TYPES, record_model  # noqa: F401


class BadRequest(Exception):
    """A 4xx with a message naming the problem (never the offending value)."""

    def __init__(self, status: int, message: str, loc: list | None = None):
        super().__init__(message)
        self.status, self.message, self.loc = status, message, loc or ["body"]


def request_model(spec: FeatureSpec, max_records: int) -> type[BaseModel]:
    return create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        records=(list[record_model(spec)], Field(..., min_length=1, max_length=max_records)),
    )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise BadRequest(400, f"duplicate JSON key {duplicate[:64]!r}")
    return dict(pairs)


def parse_body(raw: bytes, content_type: str | None) -> Any:
    """JSON -> Python, refusing the wrong content type, bad UTF-8 and duplicate keys."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise BadRequest(415, "Content-Type must be application/json", ["header", "content-type"])
    if not raw.strip():
        raise BadRequest(400, 'empty body; expected {"records": [...]}')
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        raise BadRequest(400, "body is not valid UTF-8") from None
    except RecursionError:
        raise BadRequest(400, "JSON nested too deeply") from None
    except ValueError as error:  # e.g. an integer literal over Python's 4300-digit limit
        raise BadRequest(400, f"malformed JSON: {str(error)[:120]}") from None
    except json.JSONDecodeError as error:
        raise BadRequest(400, f"malformed JSON: {error.msg} at position {error.pos}") from None


def validate_body(model: type[BaseModel], data: Any) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in error.errors()]
        raise RequestValidationError(errors) from None


MAX_ERRORS = 20  # a 4 KB body of 1,000 bad records must not get a 300 KB answer


def error_detail(errors: list[dict]) -> list[dict]:
    """At most MAX_ERRORS entries; keys in `loc` and messages cut short (never the values)."""
    detail = [
        {
            "loc": [part[:64] if isinstance(part, str) else part for part in e.get("loc", ())],
            "msg": str(e.get("msg", ""))[:200],
            "type": e.get("type"),
        }
        for e in errors[:MAX_ERRORS]
    ]
    if len(errors) > MAX_ERRORS:
        detail.append({"loc": ["body"], "msg": f"and {len(errors) - MAX_ERRORS} more errors",
                       "type": "truncated"})  # fmt: skip
    return detail


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming each field, without echoing the offending value back: a NaN or infinity
    cannot be written as JSON (FastAPI's default handler answered 500), and an echoed value
    could be a secret or a megabyte of text."""
    return JSONResponse(status_code=422, content={"detail": error_detail(error.errors())})


def openapi_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route that parses its own body, pointing at the model's schema
    (registered in OpenAPI's components by the app's GET /schema route)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


REF = r"^[A-Za-z0-9_.-]{1,64}$"  # an alias name or a version number, never a path


class CanaryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    ref: str = Field(pattern=REF)
    weight: float = Field(ge=0, le=1)


class TrafficRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    canary: CanaryRequest | None = None
    shadow: str | None = Field(None, pattern=REF)


def json_response(status: int, payload: dict, headers: dict | None = None) -> Response:
    return Response(
        json.dumps(payload), status_code=status, media_type="application/json", headers=headers
    )


def error_response(status: int, message: str, request_id: str, loc: list | None = None) -> Response:
    detail = [{"loc": loc or ["body"], "msg": message, "type": "request_error"}]
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return json_response(status, {"detail": detail, "request_id": request_id}, headers)


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed `limit` (header or stream)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadRequest(413, f"body larger than {limit} bytes", ["header", "content-length"])
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
