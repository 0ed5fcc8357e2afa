"""The models one replica serves, and how it follows the registry without a redeploy.

Each served model has a primary version (whatever its alias points at), optionally a canary
version with a share of traffic, and optionally a shadow version that is scored on the side.
The registry is the source of truth: every replica re-reads the alias and the model's traffic
file every `refresh_s` (and at once on an admin call or a `reconfigure`), loads a new version
off the event loop, warms it up and only then swaps it in. Requests already holding the old
version finish with it, so an alias move drops nothing.

With `serve.online_state`, each loaded version also gets a `state` callback on the replica's
one Redis client (`jobs.predict.OnlineState`): its history and window features are read from
the online feature state for every batch instead of the bundle's snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field

import numpy as np
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from jobs.aliases import get_alias
from jobs.errors import BundleError
from jobs.online import OnlineScorer
from jobs.predict import OnlineState
from jobs.registry import Bundle, load_bundle, resolve
from jobs.serve_config import CanaryConfig, ServeConfig, ServedModelConfig
from jobs.storage import Storage, join

logger = logging.getLogger("ray.serve")
TRAFFIC_FILE = "traffic.json"  # per model, beside its versions: canary and shadow at run time


def deployment_options(serve_cfg: ServeConfig) -> dict:
    """`serve.deployment` options of the ingress: placement, limits, replicas."""
    options: dict = {"num_cpus": serve_cfg.replica_cpus}
    if serve_cfg.replica_resources:
        options["resources"] = dict(serve_cfg.replica_resources)
    if serve_cfg.replica_labels:
        options["label_selector"] = dict(serve_cfg.replica_labels)
    scaling = serve_cfg.autoscaling
    replicas: dict = (
        {
            "autoscaling_config": AutoscalingConfig(
                min_replicas=scaling.min_replicas,
                max_replicas=scaling.max_replicas,
                target_ongoing_requests=scaling.target_ongoing_requests,
            )
        }
        if scaling.max_replicas > scaling.min_replicas
        else {"num_replicas": scaling.min_replicas}
    )
    return {
        "ray_actor_options": options,
        "max_ongoing_requests": serve_cfg.max_ongoing_requests,
        "max_queued_requests": serve_cfg.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=1),
        **replicas,
    }


@dataclass(frozen=True)
class RegistryLoader:
    """Loads bundles from the registry; injected so tests can hand in their own."""

    storage: Storage
    registry_uri: str

    def resolve(self, name: str, ref: str) -> int:
        return resolve(self.storage, self.registry_uri, name, ref)

    def fallbacks(self, name: str, alias: str) -> list[int]:
        """The alias's earlier versions, newest first: what a fresh replica serves when the
        version the alias points at cannot be loaded."""
        pointer = get_alias(self.storage, self.registry_uri, name, alias) or {}
        return [int(v) for v in reversed(pointer.get("history", []))]

    def load(self, name: str, version: int) -> Bundle:
        return load_bundle(self.storage, self.registry_uri, name, version)

    def traffic(self, name: str) -> dict | None:
        uri = join(self.registry_uri, name, TRAFFIC_FILE)
        return self.storage.read_json(uri) if self.storage.exists(uri) else None

    def set_traffic(self, name: str, traffic: dict) -> None:
        self.storage.write_json(join(self.registry_uri, name, TRAFFIC_FILE), traffic)


@dataclass
class Loaded:
    """One loaded version: the bundle, its compiled scorer, its monitor and, with the online
    state, the read-only callback its scorer reads history through."""

    bundle: Bundle
    scorer: OnlineScorer
    monitor: object | None = None
    state: object | None = None

    @property
    def version(self) -> int:
        return self.bundle.version


def compile_bundle(bundle: Bundle, online: OnlineState | None = None) -> Loaded:
    """Compiles and warms a bundle up so its first request is not the slow one (without
    Redis: a replica starts, and answers 503, while the online state is unreachable)."""
    bundle.booster.set_param({"nthread": 1})  # one core per replica; threads only contend
    scorer = OnlineScorer.from_bundle(bundle)
    scorer.score([{}])  # exercises validation and the feature path
    bundle.booster.inplace_predict(np.zeros((1, bundle.booster.num_features()), np.float32))
    state = online.reader(bundle.spec.features) if online is not None else None
    return Loaded(bundle, scorer, state=state)


@dataclass
class ServedModel:
    config: ServedModelConfig
    primary: Loaded
    canary: Loaded | None = None
    canary_weight: float = 0.0
    shadow: Loaded | None = None
    cache: dict[int, Loaded] = field(default_factory=dict)
    wanted: int | None = None  # the version the alias points at (differs if it cannot load)
    problems: list[str] = field(default_factory=list)

    def pick(self) -> Loaded:
        if self.canary is not None and random.random() < self.canary_weight:
            return self.canary
        return self.primary

    def describe(self) -> dict:
        primary_share = 1.0 - (self.canary_weight if self.canary else 0.0)
        return {
            "name": self.config.name,
            "alias": self.config.alias,
            "version": self.primary.version,
            "task": self.primary.bundle.spec.task,
            "threshold": self.primary.bundle.threshold,
            "traffic": {
                str(self.primary.version): primary_share,
                **({str(self.canary.version): self.canary_weight} if self.canary else {}),
            },
            "shadow": self.shadow.version if self.shadow else None,
            "alias_version": self.wanted,
            "problems": self.problems,
        }


class ModelTable:
    """name -> ServedModel for one replica, kept in step with the registry."""

    def __init__(
        self,
        loader: RegistryLoader,
        configs: list[ServedModelConfig],
        on_load=None,
        on_drop=None,
        online: OnlineState | None = None,
    ):
        self.loader, self.configs, self.online = loader, configs, online
        self.on_load, self.on_drop = on_load, on_drop  # e.g. start / stop a version's monitor
        self.models: dict[str, ServedModel] = {}
        self._lock = asyncio.Lock()
        self._dropped: list[Loaded] = []

    @property
    def default(self) -> str:
        return self.configs[0].name

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(name)

    def _load(self, name: str, version: int, cache: dict[int, Loaded]) -> Loaded:
        if version not in cache:
            loaded = compile_bundle(self.loader.load(name, version), self.online)
            if self.on_load is not None:
                self.on_load(loaded)
            cache[version] = loaded
        return cache[version]

    def _target(self, config: ServedModelConfig) -> tuple[int, CanaryConfig | None, str | None]:
        """(primary version, canary, shadow ref): the traffic file overrides the config."""
        traffic = self.loader.traffic(config.name)
        canary, shadow = config.canary, config.shadow
        if traffic is not None:
            canary = CanaryConfig(**traffic["canary"]) if traffic.get("canary") else None
            shadow = traffic.get("shadow")
        return self.loader.resolve(config.name, config.alias), canary, shadow

    def _try(self, name: str, ref: str, cache: dict, problems: list) -> Loaded | None:
        """A version by ref, or None with the reason noted (a bad version never stops serving)."""
        try:
            return self._load(name, self.loader.resolve(name, ref), cache)
        except Exception as error:  # noqa: BLE001  corrupt bundle, missing file, bad ref...
            problems.append(f"{name} {ref}: cannot load: {error}"[:300])
            logger.error("rayline models: %s", problems[-1])
            return None

    def _sync_one(self, config: ServedModelConfig) -> ServedModel:
        current = self.models.get(config.name)
        cache = dict(current.cache) if current else {}
        problems: list[str] = []
        version, canary, shadow = self._target(config)
        primary = self._try(config.name, str(version), cache, problems)
        if primary is None and current is not None:
            primary = current.primary  # keep serving what works
        for earlier in self.loader.fallbacks(config.name, config.alias) if not primary else []:
            primary = self._try(config.name, str(earlier), cache, problems)
            if primary is not None:
                break
        if primary is None:
            raise BundleError(f"model {config.name!r}: no loadable version; {problems}")
        served = ServedModel(config, primary, cache=cache, wanted=version, problems=problems)
        if canary is not None and canary.weight > 0:
            served.canary = self._try(config.name, canary.ref, cache, problems)
            served.canary_weight = canary.weight if served.canary else 0.0
        if shadow:
            served.shadow = self._try(config.name, shadow, cache, problems)
        if served.canary is served.primary:  # a canary of the primary is no split
            served.canary, served.canary_weight = None, 0.0
        in_use = {served.primary.version}
        in_use |= {v.version for v in (served.canary, served.shadow) if v is not None}
        served.cache = {v: loaded for v, loaded in cache.items() if v in in_use}
        self._dropped += [loaded for v, loaded in cache.items() if v not in in_use]
        return served

    def sync(self) -> dict[str, ServedModel]:
        """Blocking: loads what changed and returns the new table (not yet swapped in)."""
        table = {}
        for config in self.configs:
            table[config.name] = self._sync_one(config)
        return table

    async def refresh(self, configs: list[ServedModelConfig] | None = None) -> list[str]:
        """Re-reads the registry off the event loop, then swaps atomically; returns changes."""
        async with self._lock:
            if configs is not None:
                self.configs = configs
            before = {name: m.describe() for name, m in self.models.items()}
            table = await asyncio.to_thread(self.sync)
            self.models = table  # one assignment: a request sees the old table or the new
            dropped, self._dropped = self._dropped, []
            if self.on_drop is not None:
                for loaded in dropped:  # after in-flight requests: they hold their own copy
                    await asyncio.to_thread(self.on_drop, loaded)
            changes = [
                f"{name}: {before.get(name)} -> {model.describe()}"
                for name, model in table.items()
                if before.get(name) != model.describe()
            ]
            for change in changes:
                logger.info("rayline models: %s", change)
            return changes

    async def follow(self, every_s: float) -> None:
        """Background task: keep following aliases and traffic; a failed read keeps serving."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.refresh()
            except Exception as error:  # noqa: BLE001  the follower must outlive any bad read
                logger.warning("rayline models: refresh failed, still serving: %r", error)
