"""The bare baseline for benchmarks/serve.py: FastAPI + uvicorn doing POST /predict's work.

    RAYLINE_BENCH_CONFIG=configs/fraud.yaml RAYLINE_SERVE_TOKENS=predict:<token> \\
        uvicorn benchmarks.bare_serve:create_app --factory --workers 2 --port 8001

Each uvicorn worker loads the same bundle from the registry (the alias of the config's first
served model), parses and validates the body as rayline's app does (`record_model`, and since
the rewrite `parse_body`/`validate_body`, from serving.schema), checks a bearer token
(`hmac.compare_digest`), scores with the compiled online scorer (`jobs.online.OnlineScorer`)
when it exists, else with `jobs.predict.score_records`, and answers in rayline's shape. No
Ray, no batching across requests: one request, one call to the scorer, in the worker's loop.

Also here, for benchmarks/serve.py: the clean records it sends and the in-process ceilings.
"""

import contextlib
import hmac
import importlib
import importlib.util
import json
import os
import random
import time
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ConfigDict, Field, ValidationError, create_model

from jobs.config import Config, load_config
from jobs.registry import Bundle, load_bundle
from jobs.scoring import predictions as to_predictions
from jobs.storage import Storage, join


def _first(name: str, *modules: str, default=None):
    """`name` from the first module that has it: serving.app held these before the serving
    rewrite, which moved them to serving.schema and jobs.online."""
    for module in modules:
        with contextlib.suppress(ImportError, AttributeError):
            return getattr(importlib.import_module(module), name)
    if default is None:
        raise ImportError(f"none of {modules} defines {name}")
    return default


def _validate(model, data):
    """What FastAPI did with a body parameter before the rewrite (and validate_body does now)."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None


record_model = _first("record_model", "serving.app", "serving.schema")
records_table = _first("records_table", "serving.app", "jobs.online", "serving.schema")
validation_error = _first("validation_error", "serving.app", "serving.schema")
# Since the rewrite the ingress parses the body itself (content type, duplicate keys); before
# it, FastAPI's body parameter did json.loads and the pydantic validation.
parse_body = _first("parse_body", "serving.schema", default=lambda raw, _type: json.loads(raw))
validate_body = _first("validate_body", "serving.schema", default=_validate)


def served_model(config: Config) -> tuple[str, str]:
    """(registered name, alias) of the model rayline serves by default, for either config shape
    (`serve.models: [...]` since the serving rewrite, `serve.model`/`serve.alias` before)."""
    serve = config.serve
    models = getattr(serve, "models", None)
    if models:
        return models[0].name or config.name, models[0].alias
    return serve.model or config.name, serve.alias


def scorer(bundle: Bundle, wanted: str = ""):
    """(name, fn(records) -> (scores, reasons as a list)). RAYLINE_BENCH_SCORER picks: `online`
    (jobs.online.OnlineScorer), `records` (jobs.predict.score_records) or `auto` (the first
    if jobs/online.py exists)."""
    wanted = wanted or os.environ.get("RAYLINE_BENCH_SCORER", "auto")
    if wanted == "online" or (wanted == "auto" and importlib.util.find_spec("jobs.online")):
        from jobs.online import OnlineScorer

        online = OnlineScorer.from_bundle(bundle)

        def score(records: list[dict]):
            scores, reasons = online.score(records)
            return scores, list(reasons.to_pylist() if hasattr(reasons, "to_pylist") else reasons)

        return "jobs.online.OnlineScorer", score
    from jobs.predict import score_records

    def score(records: list[dict]):
        scores, reasons = score_records(bundle, records_table(records, bundle.spec))
        return scores, reasons.to_pylist()

    return "jobs.predict.score_records", score


def parse_tokens(value: str) -> list[tuple[set[str], str]]:
    """'predict:<token> admin,predict:<token>' -> [(scopes, token), ...]."""
    entries = []
    for entry in value.split():
        scopes, _, token = entry.partition(":")
        if token:
            entries.append((set(scopes.split(",")), token))
    return entries


def create_app() -> FastAPI:
    """The app for one uvicorn worker; the config path comes from RAYLINE_BENCH_CONFIG."""
    config = load_config(os.environ.get("RAYLINE_BENCH_CONFIG", "configs/fraud.yaml"))
    name, alias = served_model(config)
    bundle = load_bundle(Storage(config.s3), join(config.storage, "registry"), name, alias)
    spec = bundle.spec
    bundle.booster.set_param({"nthread": 1})  # one core per worker, as rayline's replicas do
    scorer_name, score = scorer(bundle)
    auth = getattr(config.serve, "auth", None)
    tokens = parse_tokens(os.environ.get(getattr(auth, "tokens_env", "RAYLINE_SERVE_TOKENS"), ""))
    request_model = create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        records=(
            list[record_model(spec)],
            Field(..., min_length=1, max_length=config.serve.max_records_per_request),
        ),
    )
    info = {"model": bundle.name, "version": bundle.version}
    api = FastAPI(title="rayline bare baseline")
    api.add_exception_handler(RequestValidationError, validation_error)

    def authorize(header: str | None, scope: str) -> None:
        if not tokens:
            return  # no tokens configured: open, like a local demo
        given = (header or "").removeprefix("Bearer ").strip().encode()
        found = None
        for scopes, token in tokens:  # compare with every token: time does not depend on which
            if hmac.compare_digest(given, token.encode()):
                found = scopes
        if found is None:
            raise HTTPException(401, "missing or unknown bearer token")
        if scope not in found:
            raise HTTPException(403, f"token lacks the {scope!r} scope")

    @api.post("/predict")
    async def predict(request: Request) -> dict:
        authorize(request.headers.get("authorization"), "predict")
        try:
            data = parse_body(await request.body(), request.headers.get("content-type"))
        except Exception as error:  # noqa: BLE001 - serving.schema.BadRequest, JSON errors
            raise HTTPException(getattr(error, "status", 400), str(error)) from None
        body = validate_body(request_model, data)
        records = [r.model_dump() for r in body.records]
        scores, reasons = score(records)
        errors = [(i, reason) for i, reason in enumerate(reasons) if reason is not None]
        if errors:
            raise HTTPException(
                status_code=422,
                detail=[
                    {
                        "loc": ["body", "records", i, reason.split(":")[0]],
                        "msg": reason,
                        "type": "value_error",
                    }
                    for i, reason in errors
                ],
            )
        preds = to_predictions(scores, spec.task, bundle.threshold, spec.classes)
        return {**info, "predictions": preds}

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "scorer": scorer_name, "pid": os.getpid(), **info}

    return api


# In-process helpers for benchmarks/serve.py: the records it sends, and the ceilings.


def clean_records(config, bundle, n: int, seed: int = 7) -> tuple[list[dict], list[float]]:
    """`n` clean records from the fact source's sample data under the API's names (they pass
    the HTTP body's pydantic model and score without a reason), and their reference scores."""
    import pyarrow.parquet as pq
    from pydantic import ValidationError

    from jobs.predict import score_records

    source = config.sources[config.fact]
    files = sorted(Path(source.uri).rglob("*.parquet"))
    if not files:
        raise SystemExit(f"no parquet sample data under {source.uri}: run `make demo` first")
    model, rows = record_model(bundle.spec), []
    for file in files[:: max(1, len(files) // 8)]:
        table = pq.read_table(file)
        table = table.rename_columns([source.rename.get(c, c) for c in table.column_names])
        rows += table.select([c for c in model.model_fields if c in table.column_names]).to_pylist()
    random.Random(seed).shuffle(rows)
    valid = []
    for row in rows[: 20 * n]:
        try:
            valid.append((row, model.model_validate_json(json.dumps(row)).model_dump()))
        except ValidationError:
            continue
    scores, reasons = score_records(bundle, records_table([v[1] for v in valid], bundle.spec))
    clean = [i for i, reason in enumerate(reasons.to_pylist()) if reason is None][:n]
    if len(clean) < n:
        raise SystemExit(f"only {len(clean)} clean records in the sample data; need {n}")
    return [valid[i][0] for i in clean], [float(scores[i]) for i in clean]


def rate(fn, seconds: float) -> float:
    """Calls per second of `fn()` over about `seconds`, after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        calls += 1
    return calls / elapsed


def ceilings(bundle, records: list[dict], scorers: list[str], seconds: float, repeat=1) -> dict:
    """In-process, one thread: the raw model (`inplace_predict`) and the bare app's scorers;
    calls/s and rows/s for 1 and for all the records, the best of `repeat` timings."""
    from jobs.featurespec import enrich, feature_matrix, transform

    bundle.booster.set_param({"nthread": 1})
    model, spec = record_model(bundle.spec), bundle.spec
    dumped = [model.model_validate_json(json.dumps(r)).model_dump() for r in records]
    enriched, _ = enrich(records_table(dumped, spec), spec, bundle.lookups, False)
    matrix = feature_matrix(transform(enriched, spec), spec.feature_names)
    calls = {"inplace_predict": lambda n: bundle.booster.inplace_predict(matrix[:n])}
    for wanted in scorers:
        name, score = scorer(bundle, wanted)
        calls[name] = lambda n, score=score: score(dumped[:n])
    out = {}
    for name, fn in calls.items():
        for n in sorted({1, len(records)}):
            per_s = max(rate(lambda fn=fn, n=n: fn(n), seconds) for _ in range(repeat))
            out[f"{name} x{n}"] = {"calls_s": round(per_s), "rows_s": round(per_s * n)}
    return out
