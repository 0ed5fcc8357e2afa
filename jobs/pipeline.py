"""The whole batch lifecycle for one config: ingest -> features -> train -> evaluate -> register.

This is what `make demo` runs locally and what `ray job submit -- python -m jobs.pipeline`
runs on a cluster. Each stage writes to the run's folder under `storage`, so a run can be
inspected, continued stage by stage (`finish_run`), or re-run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated

import typer

from jobs import registry
from jobs.cluster import load_prices
from jobs.config import Config, load_config, rebased
from jobs.drift import bundle_reference
from jobs.entrypoint import run_cli
from jobs.evaluate import evaluate
from jobs.features import build_features
from jobs.ingest import ingest
from jobs.promotion import promotion_gate
from jobs.ray_runtime import init_ray
from jobs.rightsizing import rightsize
from jobs.run_cost import DrainWatch, cost_report
from jobs.runs import new_run_id
from jobs.storage import Storage, join
from jobs.train import train_model
from jobs.usage import UsageSampler

log = logging.getLogger("rayline.pipeline")


@dataclass
class PipelineResult:
    run_uri: str
    version: int
    promoted: bool
    gate: dict
    metrics: dict
    seconds: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)


def lineage(
    config: Config, run_uri: str, storage: Storage, trained, evaluation, seconds: dict
) -> dict:
    """What a bundle records about where it came from (and the inputs of its cost)."""
    ingest_report = storage.read_json(join(run_uri, "ingest", "_report.json"))
    features_report = storage.read_json(join(run_uri, "features", "_report.json"))
    return {
        "config_digest": config.digest(),
        "config_name": config.name,
        "run_uri": run_uri,
        "task": config.task,
        "model_uri": trained.model_uri,
        "training_id": trained.training_id,
        "evaluation_uri": evaluation.metrics_uri,
        "split": features_report.get("split", {}),
        "calibration": evaluation.calibration.get("method", "none"),
        "git_commit": registry.git_commit(),
        "libraries": registry.library_versions(),
        "data": {name: report["fingerprint"] for name, report in ingest_report.items()},
        "features": features_report["fingerprints"],
        "training": {
            "plan": trained.plan,
            "reason": trained.plan_reason,
            "cpus": trained.cpus,
            "seconds": trained.seconds,
            "rounds": trained.rounds,
            "best_iteration": trained.best_iteration,
            "params": trained.params,
            "imbalance": trained.imbalance,
            "resumed_from_round": trained.resumed_from_round,
            "interruptions": trained.interruptions,
        },
        "stage_seconds": seconds,
    }


def run_cost(started_at: float, usage: UsageSampler | None, drains: DrainWatch | None) -> dict:
    """The run's cost report (with usage and rightsizing when measured). A cost detail never
    costs the run its model: any failure here becomes an `error` entry and one warning."""
    measured = usage.stop() if usage is not None else None
    try:
        cost = cost_report(started_at, drained=drains.drained if drains else None).as_dict()
        if measured is not None:
            cost["usage"] = measured
            cost["rightsizing"] = rightsize(measured, cost, load_prices())
        return cost
    except Exception as error:  # noqa: BLE001 - reported, never fatal
        message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        log.warning("run cost not computed: %s", message)
        return {"error": message, "started_at": started_at, "ended_at": time.time()}


def _timed(seconds: dict, name: str, function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    seconds[name] = round(time.perf_counter() - started, 3)
    return value


def finish_run(
    config: Config,
    run_uri: str,
    storage: Storage | None = None,
    params_override: dict | None = None,
    extra_lineage: dict | None = None,
    seconds: dict | None = None,
    quiet: bool = False,
    started_at: float | None = None,
    usage: UsageSampler | None = None,
    drains: DrainWatch | None = None,
):
    """Train -> evaluate -> gate -> publish for a run that already has features.

    The run's cost covers `started_at` (default: now) to just before the bundle is published,
    so the bundle's lineage carries it; with a `usage` sampler running it also carries what the
    nodes used and a rightsizing recommendation."""
    from jobs import summary

    storage = storage or Storage(config.s3)
    seconds = seconds if seconds is not None else {}
    started_at = started_at if started_at is not None else time.time()
    trained = _timed(seconds, "train", train_model, config, run_uri, storage, params_override)
    evaluation = _timed(
        seconds, "evaluate", evaluate, config, run_uri, storage, model_uri=trained.model_uri
    )
    reference = _timed(
        seconds,
        "reference",
        bundle_reference,
        storage,
        run_uri,
        trained.model_uri,
        evaluation.calibration,
    )
    registry_uri = join(config.storage, "registry")
    gate = promotion_gate(config, run_uri, evaluation.metrics, storage)
    cost = run_cost(started_at, usage, drains)
    storage.write_json(join(run_uri, "cost.json"), cost)
    record = {
        **lineage(config, run_uri, storage, trained, evaluation, seconds),
        "cost": {k: v for k, v in cost.items() if k not in ("nodes", "usage")},
        **(extra_lineage or {}),
    }
    version = registry.publish(
        storage,
        registry_uri,
        config.name,
        run_uri,
        evaluation.threshold,
        evaluation.metrics,
        record,
        model_uri=trained.model_uri,
        extra_files={
            "calibration.json": json.dumps(evaluation.calibration).encode(),
            "reference.json": json.dumps(reference).encode(),
        },
    )
    registry.set_alias(storage, registry_uri, config.name, "candidate", version, gate["reason"])
    if gate["promote"]:
        registry.set_alias(
            storage, registry_uri, config.name, "production", version, gate["reason"]
        )
    result = PipelineResult(
        run_uri, version, gate["promote"], gate, evaluation.metrics, seconds, cost
    )
    storage.write_json(join(run_uri, "pipeline.json"), asdict(result))
    if not quiet:
        summary.print_training(trained, evaluation, result)
        summary.print_cost(cost)
    return result


def run_pipeline(
    config: Config, storage: Storage | None = None, quiet: bool = False
) -> PipelineResult:
    """Runs every batch stage for `config` and registers the model (promoting it if it wins)."""
    from jobs import summary

    storage = storage or Storage(config.s3)
    started_at = time.time()
    seconds = {"ray_start": init_ray(config)}
    run_uri = join(config.storage, "runs", new_run_id())
    with UsageSampler() as usage, DrainWatch() as drains:  # finish_run reads both
        ingested = _timed(seconds, "ingest", ingest, config, run_uri, storage)
        features = _timed(
            seconds, "features", build_features, config, run_uri, storage, ingested.fact_blocks
        )
        if not quiet:
            summary.print_ingest(ingested)
            summary.print_features(features)
        return finish_run(
            config,
            run_uri,
            storage,
            seconds=seconds,
            quiet=quiet,
            started_at=started_at,
            usage=usage,
            drains=drains,
        )


def main(
    config: Annotated[str, typer.Option(help="Path to the pipeline config YAML")],
    storage: Annotated[str, typer.Option(help="Override the config's storage URI")] = "",
    root: Annotated[
        str,
        typer.Option(
            help="Resolve the config's relative data and storage paths under this "
            'folder (under `ray job submit`: --root "$PWD")'
        ),
    ] = "",
) -> None:
    """Run ingest -> features -> train -> evaluate -> register for one config."""
    overrides = {"storage": storage} if storage else {}
    loaded = load_config(config, overrides)
    run_pipeline(rebased(loaded, root) if root else loaded)


if __name__ == "__main__":
    run_cli(main)
