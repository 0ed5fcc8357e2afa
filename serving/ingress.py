"""The Ray Serve ingress: one FastAPI deployment that holds the models and batches their calls.

One hop: the models live in the ingress replica (no second deployment, no handle call), each
request is scored by the compiled online path (`jobs.online`), and `@serve.batch` merges
concurrent requests into one model call per version. Replicas follow the registry's aliases and
traffic split (`serving.slots`), so moving an alias needs no redeploy. With
`serve.online_state`, history comes from the online feature state in Redis, one round trip per
batch; while Redis is unreachable /predict answers 503 naming the broker. Routes:
POST /predict, POST /models/{name}/predict (scope predict); GET /models (predict);
POST /admin/models/{name}/reload|rollback, PUT /admin/models/{name}/traffic (admin);
GET /healthz, GET /readyz (no token: probes).
"""

import asyncio
import logging
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.requests import ClientDisconnect

from jobs.aliases import rollback
from jobs.config import Config
from jobs.errors import BundleError, ConfigError, RaylineError, StreamError
from jobs.predict import OnlineState
from jobs.scoring import predictions as to_predictions
from jobs.serve_config import ServedModelConfig, check_online_state
from jobs.storage import Storage, join
from jobs.stream_keys import StreamKeys
from serving.auth import Authenticator, AuthFailure
from serving.monitoring import Monitor, count_request, sample_uri
from serving.schema import (
    BadRequest,
    TrafficRequest,
    error_detail,
    error_response,
    json_response,
    openapi_body,
    parse_body,
    read_limited,
    request_model,
    validate_body,
    validation_error,
)
from serving.slots import Loaded, ModelTable, RegistryLoader, deployment_options

logger = logging.getLogger("ray.serve")
AUTH_LOC = ["header", "authorization"]


def records_in(items: list[tuple[Loaded, list[dict]]]) -> int:
    return sum(len(records) for _, records in items)


def build_app(config: Config, loader: RegistryLoader | None = None):
    """The Serve application for `config`: one ingress deployment holding the served models."""
    serve_cfg = config.serve
    check_online_state(config, ConfigError)
    online = (config.stream, StreamKeys.of(config).prefix) if serve_cfg.online_state else None
    if loader is None:
        loader = RegistryLoader(Storage(config.s3), join(config.storage, "registry"))
    # Fail before Ray starts: tokens configured, every model's alias resolvable. Replicas get
    # the tokens' digests, never the tokens, so they need no secret env on their nodes.
    authenticator = Authenticator.from_config(serve_cfg.auth)
    # Each model's request schema comes from the version its alias points at now; a version
    # with a different record schema needs a redeploy (the schema is the API's contract).
    body_models = {
        model.name: request_model(
            loader.load(model.name, loader.resolve(model.name, model.alias)).spec,
            serve_cfg.max_records_per_request,
        )
        for model in serve_cfg.models
    }
    body_model = body_models[serve_cfg.models[0].name]
    samples = sample_uri(config.storage, serve_cfg.monitoring)
    openapi_extra = openapi_body(body_model)
    api = FastAPI(title="rayline", description="Scores raw records with registered models.")
    api.add_exception_handler(RequestValidationError, validation_error)
    user_config = {"models": [m.model_dump() for m in serve_cfg.models]}

    @serve.deployment(user_config=user_config, **deployment_options(serve_cfg))
    @serve.ingress(api)
    class Ingress:
        def __init__(self, registry: RegistryLoader, auth: Authenticator):
            self.auth = auth
            self.table = ModelTable(
                registry, serve_cfg.models, self._monitor, self._unmonitor,
                OnlineState(*online) if online else None,  # one Redis client per replica
            )  # fmt: skip
            self.registry = registry
            self.ready = False
            self.follower: asyncio.Task | None = None
            self.background: set[asyncio.Task] = set()  # shadow scoring; kept until done

        async def reconfigure(self, user_config: dict) -> None:
            """Initial load and every `serve deploy` with new models/aliases/traffic."""
            configs = [ServedModelConfig(**m) for m in user_config["models"]]
            await self.table.refresh(configs)
            self.ready = True
            if self.follower is None:
                self.follower = asyncio.get_running_loop().create_task(
                    self.table.follow(serve_cfg.refresh_s)
                )

        def _monitor(self, loaded: Loaded) -> None:
            bundle = loaded.bundle
            loaded.monitor = Monitor(
                bundle.name,
                bundle.version,
                bundle.reference,
                serve_cfg.monitoring,
                self.registry.storage,
                samples,
                task=bundle.spec.task,
                feature_names=bundle.spec.feature_names,
            )

        @staticmethod
        def _unmonitor(loaded: Loaded) -> None:
            if loaded.monitor is not None:
                loaded.monitor.close()

        def __del__(self) -> None:
            table = getattr(self, "table", None)  # absent if the constructor failed
            for model in table.models.values() if table else []:
                for loaded in model.cache.values():
                    self._unmonitor(loaded)

        def check_health(self) -> None:
            if not self.ready:
                raise RuntimeError("models not loaded yet")

        @serve.batch(
            max_batch_size=serve_cfg.max_batch_size,
            batch_wait_timeout_s=serve_cfg.batch_wait_timeout_s,
            batch_size_fn=records_in,  # a batch is capped in records, not in requests
        )
        async def score_batch(self, items: list[tuple[Loaded, list[dict]]]) -> list[tuple]:
            """One model call per version for all requests waiting in this batch."""
            results: list[Any] = [None] * len(items)
            groups: dict[int, list[int]] = {}
            for index, (loaded, _) in enumerate(items):
                groups.setdefault(id(loaded), []).append(index)
            for indexes in groups.values():
                try:
                    self._score_group(items, indexes, results)
                except StreamError as error:  # the online state is down: down for every one
                    results = [error if i in indexes else r for i, r in enumerate(results)]
                except Exception:  # noqa: BLE001  one request's failure stays its own
                    for index in indexes:
                        try:
                            self._score_group(items, [index], results)
                        except Exception as error:  # noqa: BLE001
                            results[index] = error
            return results

        @staticmethod
        def _score_group(items: list, indexes: list[int], results: list) -> None:
            loaded = items[indexes[0]][0]
            flat = [record for i in indexes for record in items[i][1]]
            matrix, reasons = loaded.scorer.features(flat, state=loaded.state)
            scores = loaded.scorer.scores_for(matrix, reasons)
            loaded.monitor.observe_batch(len(flat))
            start = 0
            for i in indexes:
                end = start + len(items[i][1])
                results[i] = (scores[start:end], reasons[start:end], matrix[start:end])
                start = end

        async def _score(self, loaded: Loaded, records: list[dict]):
            # @serve.batch refuses one call larger than max_batch_size (Serve 2.60 raises), so a
            # large request goes as several calls and is put back together in order.
            size = serve_cfg.max_batch_size
            parts = await asyncio.gather(
                *[
                    self.score_batch((loaded, records[start : start + size]))
                    for start in range(0, len(records), size)
                ]
            )
            for part in parts:
                if isinstance(part, Exception):
                    raise part
            if len(parts) == 1:
                return parts[0]
            scores, reasons, matrices = zip(*parts, strict=True)
            flat = [reason for part in reasons for reason in part]
            return np.concatenate(scores), flat, np.concatenate(matrices)

        async def _predict(self, request: Request, name: str | None) -> Response:
            started = time.perf_counter()
            # Serve's proxy (or HAProxy) has put the client's X-Request-Id, or a new one, on the
            # request and echoes it on the response; the body and the logs carry the same id.
            request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
            status, model_name, loaded = 500, name or self.table.default, None
            route = "/predict" if name is None else "/models/{name}/predict"
            scores = matrix = records = predictions = None
            try:
                self.auth.check(request.headers.get("authorization"), "predict")
                served = self.table.get(model_name)
                if served is None:
                    status = 404
                    message = f"no model named {model_name!r}"
                    return error_response(404, message, request_id, ["path"])
                raw = await read_limited(request, serve_cfg.max_body_bytes)
                data = parse_body(raw, request.headers.get("content-type"))
                body = validate_body(body_models[model_name], data)
                records = [r.model_dump() for r in body.records]
                loaded = served.pick()
                scores, reasons, matrix = await asyncio.wait_for(
                    self._score(loaded, records), serve_cfg.request_timeout_s
                )
                errors = [
                    {
                        "loc": ["body", "records", i, reason.split(":")[0]],
                        "msg": reason,
                        "type": "value_error",
                    }
                    for i, reason in enumerate(reasons)
                    if reason is not None
                ]
                if errors:
                    status = 422
                    detail = error_detail(errors)
                    return json_response(422, {"detail": detail, "request_id": request_id})
                spec = loaded.bundle.spec
                threshold = loaded.bundle.threshold
                predictions = to_predictions(scores, spec.task, threshold, spec.classes)
                payload = {
                    "model": model_name,
                    "version": loaded.version,
                    "request_id": request_id,
                    "predictions": predictions,
                }
                if served.shadow is not None and served.shadow is not loaded:
                    task = asyncio.get_running_loop().create_task(
                        self._shadow(served.shadow, records, scores, request_id, model_name)
                    )
                    self.background.add(task)
                    task.add_done_callback(self.background.discard)
                status = 200
                return json_response(200, payload)
            except AuthFailure as failure:
                status = failure.status
                return error_response(failure.status, failure.message, request_id, AUTH_LOC)
            except BadRequest as bad:
                status = bad.status
                return error_response(bad.status, bad.message, request_id, bad.loc)
            except RequestValidationError as invalid:
                status = 422
                detail = error_detail(invalid.errors())
                return json_response(422, {"detail": detail, "request_id": request_id})
            except StreamError as error:  # online state unreachable: retry, not a server bug
                status = 503
                detail = [{"loc": ["state"], "msg": str(error), "type": "unavailable"}]
                body = {"detail": detail, "request_id": request_id}
                return json_response(503, body, {"Retry-After": "1"})
            except TimeoutError:
                status = 504
                message = f"scoring took over {serve_cfg.request_timeout_s} s"
                return error_response(504, message, request_id)
            except (ClientDisconnect, asyncio.CancelledError):
                status = 499  # the client went away: not a server error, nothing to answer
                raise
            finally:
                seconds = time.perf_counter() - started
                if loaded is None:  # refused before a model was picked: bounded labels only
                    known = self.table.get(model_name) is not None
                    count_request(model_name if known else "", "", route, status, seconds)
                else:
                    loaded.monitor.observe(
                        route, status, seconds, matrix if status == 200 else None,
                        scores if status == 200 else None, request_id, records, predictions,
                    )  # fmt: skip
                logger.info(
                    "predict",
                    extra={
                        "rayline_request_id": request_id,
                        "model": model_name,
                        "version": loaded.version if loaded else None,
                        "status": status,
                        "latency_ms": round(seconds * 1000, 3),
                    },
                )

        async def _shadow(self, shadow: Loaded, records, primary, request_id, name) -> None:
            """Scores the shadow version and logs how it compares; the client never waits."""
            scores, _ = shadow.scorer.score(records, state=shadow.state)
            difference = np.abs(np.nan_to_num(scores) - np.nan_to_num(primary))
            logger.info(
                "shadow",
                extra={
                    "rayline_request_id": request_id,
                    "model": name,
                    "shadow_version": shadow.version,
                    "max_abs_difference": float(difference.max()) if difference.size else 0.0,
                },
            )

        @api.post("/predict", openapi_extra=openapi_extra)
        async def predict(self, request: Request) -> Response:
            return await self._predict(request, None)

        @api.post("/models/{name}/predict", openapi_extra=openapi_extra)
        async def predict_model(self, name: str, request: Request) -> Response:
            return await self._predict(request, name)

        @api.get("/schema", responses={200: {"model": body_model}})
        async def schema(self) -> JSONResponse:
            """The JSON schema of the body POST /predict takes (also under /docs)."""
            return JSONResponse(body_model.model_json_schema())

        @api.get("/healthz")
        async def healthz(self) -> dict:
            return {"status": "ok"}

        @api.get("/readyz")
        async def readyz(self) -> Response:
            if not self.ready:
                return JSONResponse({"status": "loading"}, status_code=503)
            return JSONResponse({"status": "ready", "models": self._describe()})

        def _describe(self) -> list[dict]:
            return [model.describe() for model in self.table.models.values()]

        @api.get("/models")
        async def models(self, request: Request) -> Response:
            return await self._guarded(request, "predict", None, self._list)

        async def _list(self, name: str | None) -> dict:
            return {"default": self.table.default, "models": self._describe()}

        async def _guarded(self, request: Request, scope: str, name: str | None, action):
            request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
            try:
                self.auth.check(request.headers.get("authorization"), scope)
                if name is not None and self.table.get(name) is None:
                    return error_response(404, f"no model named {name!r}", request_id, ["path"])
                return json_response(200, await action(name))
            except AuthFailure as failure:
                return error_response(failure.status, failure.message, request_id, AUTH_LOC)
            except BadRequest as bad:
                return error_response(bad.status, bad.message, request_id, bad.loc)
            except RequestValidationError as invalid:
                detail = error_detail(invalid.errors())
                return json_response(422, {"detail": detail, "request_id": request_id})
            except (BundleError, RaylineError) as error:
                return error_response(409, str(error), request_id)
            except Exception as error:  # noqa: BLE001  e.g. a bundle that does not parse
                logger.error("rayline admin: %r", error)
                message = f"{type(error).__name__}: {str(error)[:200]}"
                return error_response(409, message, request_id)

        @api.post("/admin/models/{name}/reload")
        async def reload(self, name: str, request: Request) -> Response:
            return await self._guarded(request, "admin", name, self._reload)

        async def _reload(self, name: str) -> dict:
            changes = await self.table.refresh()
            return {"changes": changes, "model": self.table.get(name).describe()}

        @api.post("/admin/models/{name}/rollback")
        async def rollback_route(self, name: str, request: Request) -> Response:
            return await self._guarded(request, "admin", name, self._rollback)

        async def _rollback(self, name: str) -> dict:
            alias = self.table.get(name).config.alias
            pointer = await asyncio.to_thread(
                rollback, self.registry.storage, self.registry.registry_uri, name, alias
            )
            await self.table.refresh()
            return {"alias": alias, "pointer": pointer, "model": self.table.get(name).describe()}

        @api.put("/admin/models/{name}/traffic")
        async def traffic(self, name: str, request: Request) -> Response:
            async def change(model: str) -> dict:
                raw = await read_limited(request, 10_000)
                wanted = validate_body(
                    TrafficRequest, parse_body(raw, request.headers.get("content-type"))
                )
                for ref in [wanted.canary.ref if wanted.canary else None, wanted.shadow]:
                    if ref:  # a version that does not load is refused before anything is written
                        version = await asyncio.to_thread(self.registry.resolve, model, ref)
                        await asyncio.to_thread(self.registry.load, model, version)
                await asyncio.to_thread(
                    self.registry.set_traffic, model, wanted.model_dump(mode="json")
                )
                await self.table.refresh()
                return {"model": self.table.get(model).describe()}

            return await self._guarded(request, "admin", name, change)

    return Ingress.bind(loader, authenticator)
