"""Ray Serve app: a FastAPI ingress in front of a model deployment that batches requests.

The record schema of `POST /predict` is generated from the bundle's FeatureSpec, so OpenAPI
at /docs shows exactly the fields a record needs, and FastAPI answers 422 naming the field.
Rule violations (an unknown currency, an amount out of range) are 422 too, with the rule.
Scoring goes through `jobs.predict.score_records`, the same function batch inference uses.
"""

import asyncio
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Annotated, Any

import pyarrow as pa
import typer
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    create_model,
)
from ray import serve
from ray.serve.handle import DeploymentHandle

from jobs.config import Config, load_config
from jobs.featurespec import FeatureSpec, online_source
from jobs.predict import score_records
from jobs.registry import Bundle, load_bundle, resolve
from jobs.scoring import predictions as to_predictions
from jobs.storage import Storage, join
from jobs.validate import ARROW_TYPES

PYTHON_TYPES = {
    # Strict: `true` is not an id or a number, and "5" is not an integer (422, naming the
    # field). Ids often arrive as numbers; they are compared as strings.
    "string": StrictStr | StrictInt,
    "int64": Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)],
    # NaN, ±Infinity and numbers too large for a double (which JSON parsing turns into
    # infinity) are 422, naming the field, never a score.
    "float64": Annotated[float, Field(allow_inf_nan=False, strict=True)],
    "bool": StrictBool,
    "timestamp": datetime,
    "date": date,
}


@dataclass(frozen=True)
class BundleLoader:
    """Loads a bundle by alias or version; injected so tests can hand in their own."""

    storage: Storage
    registry_uri: str
    name: str
    ref: str = "production"

    def __call__(self) -> Bundle:
        return load_bundle(self.storage, self.registry_uri, self.name, self.ref)


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


def records_table(records: list[dict], spec: FeatureSpec) -> pa.Table:
    source = online_source(spec.source, spec.features.label)
    columns = {}
    for column, kind in source.types.items():
        values = [record.get(column) for record in records]
        if kind == "string":
            values = [None if v is None else str(v) for v in values]
        elif kind == "timestamp":
            values = [_utc_naive(v) for v in values]
        columns[column] = pa.array(values, ARROW_TYPES[kind])
    return pa.table(columns)


def _utc_naive(value: datetime | None) -> datetime | None:
    """Timestamps are stored as naive UTC; convert aware ones, keep naive ones as they are."""
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming each field, without echoing the offending value back: a NaN or infinity
    cannot be written as JSON (FastAPI's default handler answered 500), and an echoed value
    could be a secret or a megabyte of text."""
    detail = [
        {
            "loc": list(item.get("loc", ())),
            "msg": str(item.get("msg", "")),
            "type": item.get("type"),
        }
        for item in error.errors()
    ]
    return JSONResponse(status_code=422, content={"detail": detail})


class ModelServer:
    """Holds one bundle and scores batches of requests in one call to the model."""

    def __init__(self, loader: BundleLoader):
        self.bundle = loader()

    def info(self) -> dict:
        return {
            "model": self.bundle.name,
            "version": self.bundle.version,
            "task": self.bundle.spec.task,
            "threshold": self.bundle.threshold,
        }

    async def score(self, requests: list[list[dict]]) -> list[dict]:
        flat = [record for request in requests for record in request]
        # Arrow joins and XGBoost release the GIL; off the event loop, the replica keeps
        # accepting requests (and filling the next batch) while this one is scored.
        scores, reasons = await asyncio.to_thread(
            score_records, self.bundle, records_table(flat, self.bundle.spec)
        )
        reasons = reasons.to_pylist()
        results, start = [], 0
        for request in requests:
            end = start + len(request)
            errors = [
                {"index": i - start, "reason": reasons[i]}
                for i in range(start, end)
                if reasons[i] is not None
            ]
            spec = self.bundle.spec
            predictions = (
                []
                if errors
                else to_predictions(
                    scores[start:end], spec.task, self.bundle.threshold, spec.classes
                )
            )
            results.append({"errors": errors, "predictions": predictions, **self.info()})
            start = end
        return results


def records_in(requests: list[list[dict]]) -> int:
    return sum(len(records) for records in requests)


def build_app(config: Config, loader: BundleLoader | None = None):
    """The Serve application for `config`: Ingress -> ModelServer (with @serve.batch)."""
    serve_cfg = config.serve
    if loader is None:
        storage, registry_uri = Storage(config.s3), join(config.storage, "registry")
        name = serve_cfg.model or config.name
        # Resolve the alias once: the request schema and every replica use that same version.
        version = resolve(storage, registry_uri, name, serve_cfg.alias)
        loader = BundleLoader(storage, registry_uri, name, str(version))
    spec = loader().spec
    record = record_model(spec)
    request_model = create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        records=(
            list[record],
            Field(..., min_length=1, max_length=serve_cfg.max_records_per_request),
        ),
    )
    api = FastAPI(title="rayline", description="Scores raw records with the registered model.")
    api.add_exception_handler(RequestValidationError, validation_error)

    batched = serve.batch(
        max_batch_size=serve_cfg.max_batch_size,
        batch_wait_timeout_s=serve_cfg.batch_wait_timeout_s,
        batch_size_fn=records_in,  # a batch is capped in records, not in requests
    )(ModelServer.score)
    # Serve admits 5 requests per replica by default, which capped every @serve.batch call at
    # 5 requests whatever max_batch_size said (Serve logs a warning saying so).
    ongoing = max(serve_cfg.max_batch_size, 5)
    model = serve.deployment(
        type("ModelServer", (ModelServer,), {"score": batched}),
        ray_actor_options={"num_cpus": serve_cfg.replica_cpus},
        max_ongoing_requests=ongoing,
    )

    @serve.deployment(
        ray_actor_options={"num_cpus": serve_cfg.replica_cpus}, max_ongoing_requests=ongoing
    )
    @serve.ingress(api)
    class Ingress:
        def __init__(self, model_handle: DeploymentHandle):
            self.model = model_handle

        @api.post("/predict")
        async def predict(self, body: request_model) -> dict:  # type: ignore[valid-type]
            records = [r.model_dump() for r in body.records]
            # @serve.batch refuses a single call larger than max_batch_size (Serve 2.60
            # raises), so a large request goes as several calls and is put back together.
            size = serve_cfg.max_batch_size
            parts = await asyncio.gather(
                *[
                    self.model.score.remote(records[start : start + size])
                    for start in range(0, len(records), size)
                ]
            )
            result = {
                **parts[0],
                "errors": [
                    {**error, "index": error["index"] + number * size}
                    for number, part in enumerate(parts)
                    for error in part["errors"]
                ],
                "predictions": [p for part in parts for p in part["predictions"]],
            }
            if result["errors"]:
                raise HTTPException(
                    status_code=422,
                    detail=[
                        {
                            "loc": ["body", "records", e["index"], e["reason"].split(":")[0]],
                            "msg": e["reason"],
                            "type": "value_error",
                        }
                        for e in result["errors"]
                    ],
                )
            return {
                "model": result["model"],
                "version": result["version"],
                "predictions": result["predictions"],
            }

        @api.get("/healthz")
        async def healthz(self) -> dict:
            return {"status": "ok", **(await self.model.info.remote())}

    return Ingress.bind(model.bind(loader))


def app_builder(args: dict):
    """Entry point for `serve run serving.app:app_builder config=configs/fraud.yaml`."""
    return build_app(load_config(args["config"]))


def deploy(config: Config, loader: BundleLoader | None = None, wait_s: float = 120.0) -> str:
    """Starts Serve on the configured host/port and deploys; returns the base URL."""
    from jobs.ray_runtime import init_ray

    app = build_app(config, loader)  # resolves the alias first: a bad one fails before Ray
    init_ray(config)
    quiet = {"log_level": "WARNING"}  # request logs stay in Ray's log files, not the console
    serve.start(
        http_options={
            "host": config.serve.host,
            "port": config.serve.port,
            "request_timeout_s": config.serve.request_timeout_s,
        },
        logging_config=quiet,
    )
    serve.run(
        app,
        name="rayline",
        route_prefix="/",
        blocking=False,
        logging_config=quiet,
    )
    url = f"http://{config.serve.host}:{config.serve.port}"
    deadline = time.monotonic() + wait_s
    import requests

    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"Serve app did not answer {url}/healthz within {wait_s:.0f} s")


def main(
    config: Annotated[str, typer.Option(help="Pipeline config YAML (its serve: section)")],
) -> None:
    """Serve the production model until interrupted (what `make serve` runs)."""
    url = deploy(load_config(config))
    typer.echo(f"serving on {url} (POST /predict, GET /healthz, docs at /docs); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    from jobs.entrypoint import run_cli

    run_cli(main)
