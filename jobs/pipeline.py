"""The whole batch lifecycle for one config: ingest -> features -> train -> evaluate -> register.

This is what `make demo` runs locally and what `ray job submit -- python -m jobs.pipeline`
runs on a cluster. Each stage writes to the run's folder under `storage`, so a run can be
inspected, resumed stage by stage, or re-run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Annotated

import typer

from jobs import registry
from jobs.config import Config, load_config
from jobs.evaluate import evaluate, promotion_gate
from jobs.features import build_features
from jobs.ingest import ingest
from jobs.runtime import init_ray, new_run_id
from jobs.storage import Storage, join
from jobs.train import train_model


@dataclass
class PipelineResult:
    run_uri: str
    version: int
    promoted: bool
    gate: dict
    metrics: dict
    seconds: dict = field(default_factory=dict)


def lineage(config: Config, run_uri: str, ingest_result, features_result, train_result,
            seconds: dict) -> dict:
    return {
        "config_digest": config.digest(),
        "config_name": config.name,
        "run_uri": run_uri,
        "git_commit": registry.git_commit(),
        "libraries": registry.library_versions(),
        "data": {name: report.fingerprint for name, report in ingest_result.sources.items()},
        "features": features_result.fingerprints,
        "training": {"plan": train_result.plan, "reason": train_result.plan_reason,
                     "cpus": train_result.cpus, "seconds": train_result.seconds,
                     "rounds": train_result.rounds, "best_iteration": train_result.best_iteration,
                     "params": train_result.params, "imbalance": train_result.imbalance},
        "stage_seconds": seconds,
    }


def run_pipeline(config: Config, storage: Storage | None = None, quiet: bool = False) -> PipelineResult:
    """Runs every batch stage for `config` and registers the model (promoting it if it wins)."""
    from jobs import summary

    storage = storage or Storage(config.s3)
    seconds = {"ray_start": init_ray(config)}
    run_uri = join(config.storage, "runs", new_run_id())

    def timed(name, function, *args):
        started = time.perf_counter()
        value = function(*args)
        seconds[name] = round(time.perf_counter() - started, 3)
        return value

    ingested = timed("ingest", ingest, config, run_uri, storage)
    features = timed("features", build_features, config, run_uri, storage)
    trained = timed("train", train_model, config, run_uri, storage)
    evaluation = timed("evaluate", evaluate, config, run_uri, storage)
    registry_uri = join(config.storage, "registry")
    gate = promotion_gate(config, run_uri, evaluation.metrics, storage)
    version = registry.publish(
        storage, registry_uri, config.name, run_uri, evaluation.threshold, evaluation.metrics,
        lineage(config, run_uri, ingested, features, trained, seconds),
    )
    registry.set_alias(storage, registry_uri, config.name, "candidate", version, gate["reason"])
    if gate["promote"]:
        registry.set_alias(storage, registry_uri, config.name, "production", version, gate["reason"])
    result = PipelineResult(run_uri, version, gate["promote"], gate, evaluation.metrics, seconds)
    storage.write_json(join(run_uri, "pipeline.json"), asdict(result))
    if not quiet:
        summary.print_pipeline(ingested, features, trained, evaluation, result)
    return result


def main(
    config: Annotated[str, typer.Option(help="Path to the pipeline config YAML")],
    storage: Annotated[str, typer.Option(help="Override the config's storage URI")] = "",
) -> None:
    """Run ingest -> features -> train -> evaluate -> register for one config."""
    overrides = {"storage": storage} if storage else {}
    run_pipeline(load_config(config, overrides))


if __name__ == "__main__":
    typer.run(main)
