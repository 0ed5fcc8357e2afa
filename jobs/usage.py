"""What a run used of its cluster: CPU, memory and GPU per node, sampled while it ran.

A run is priced by node-hours (jobs/run_cost.py); whether those hours were needed is a question
of use. `UsageSampler` is started on the driver at the beginning of a run and stopped at the end.
A driver thread samples every `interval_s`:

- Ray's logical reservation (CPUs/GPUs reserved of each node's total) from the GCS, through
  `ray._private.state.available_resources_per_node` (a DeveloperAPI; no dashboard needed).
- Physical use, from one tiny probe actor per alive node (num_cpus=0, hard NodeAffinity),
  started lazily for nodes that join later. A probe reads psutil twice over: the node's own Ray
  processes (its raylet and every descendant: workers, agents; not the probe) and the whole host.
  Nodes of one local cluster share a host, whose figures cannot tell them apart; a cloud node
  owns its host, whose figures count what the Ray tree misses (the head's GCS, the OS). So the
  summary's main figures (`basis`) are the host's for a node alone on its host, else the Ray
  processes'; the `ray_*` figures are always the Ray processes'.
  CPU is cores busy between two samples (CPU seconds of each (pid, start time) / wall seconds);
  a process that exits loses its last interval. Memory of the tree is each process's private
  resident memory (rss - shared) plus the raylet's shared pages (the object store), so plasma
  pages mapped by many workers count once.
- GPU utilisation and memory where pynvml or nvidia-smi exists on the node (else none).

Best-effort: a dead probe or node is dropped, a late probe is waited for on the next tick, and
sampling errors are logged; none ever fails the run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
from typing import Any

log = logging.getLogger(__name__)
RETRY_S = 30.0


class _Probe:
    """Runs on one node; answers `sample()` with its node's CPU, memory and GPU use."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.raylet = self._raylet()
        self.previous: dict[tuple[int, float], float] = {}
        self.previous_at: float | None = None
        psutil.cpu_percent(None)  # primes the host-wide counter
        self.host = f"{socket.gethostname()}:{int(psutil.boot_time())}"
        self.gpu = _gpu_reader()

    def _raylet(self):
        process = self.me.parent()
        while process is not None and process.name() != "raylet":
            process = process.parent()
        return process or self.me.parent()

    def sample(self) -> dict[str, Any]:
        psutil = self.psutil
        now = time.monotonic()
        cpu: dict[tuple[int, float], float] = {}
        private = 0
        processes = [self.raylet, *self.raylet.children(recursive=True)]
        for process in processes:
            if process.pid == self.me.pid:
                continue
            try:
                with process.oneshot():
                    times, memory = process.cpu_times(), process.memory_info()
                    cpu[(process.pid, process.create_time())] = times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            private += max(memory.rss - memory.shared, 0)
            if process.pid == self.raylet.pid:
                private += memory.shared
        busy = None
        if self.previous_at is not None:
            since = time.time() - (now - self.previous_at)  # epoch time of the last sample
            # A process started since the last sample counts whole; one seen before counts
            # its growth; one the last sample missed although older is not guessed at.
            spent = sum(
                seconds - self.previous.get(key, 0.0 if key[1] >= since else seconds)
                for key, seconds in cpu.items()
            )
            busy = max(spent, 0.0) / max(now - self.previous_at, 1e-6)
        self.previous, self.previous_at = cpu, now
        own = self.me.cpu_times()
        virtual = psutil.virtual_memory()
        return {
            "pid": self.me.pid,
            "host": self.host,
            "cpu_busy": busy,
            "memory_bytes": private,
            "host_cpu_busy": psutil.cpu_percent(None) / 100 * psutil.cpu_count(),
            "host_memory_bytes": virtual.total - virtual.available,
            "host_memory_total_bytes": virtual.total,
            "host_cpus": psutil.cpu_count(),
            "probe_cpu_s": own.user + own.system,
            **(self.gpu() if self.gpu else {}),
        }


def _gpu_reader():
    """A function returning the node's GPU use (all GPUs summed), or None without GPUs."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

        def read_nvml():
            rates = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
            memory = sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles)
            return {"gpu_busy": sum(rates) / 100, "gpu_memory_bytes": memory}

        return read_nvml if handles else None
    except Exception:  # noqa: BLE001 - no pynvml or no driver: try nvidia-smi
        pass
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None

    def read_smi():
        query = ["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        out = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=10)
        rows = [[float(v) for v in line.split(",")] for line in out.stdout.strip().splitlines()]
        return {
            "gpu_busy": sum(r[0] for r in rows) / 100,
            "gpu_memory_bytes": sum(r[1] for r in rows) * 2**20,
        }

    return read_smi


def node_key(record: dict) -> tuple[str, str | None, str]:
    """(node_type, instance, market) of a GCS node record, exactly as the cost report groups."""
    from jobs.run_cost import node_usage

    usage = node_usage({**record, "end_ms": None, "start_ms": 0}, 0.0, 1.0, {})
    return usage.node_type, usage.instance, usage.market


class UsageSampler:
    """Samples the cluster's use from the driver; `start()` at the run's beginning, `stop()` at its
    end (it returns `summary()`). Also a context manager."""

    def __init__(self, interval_s: float = 2.0, wait_s: float | None = None):
        self.interval_s = interval_s
        self.wait_s = wait_s if wait_s is not None else min(interval_s / 2, 1.0)
        self.samples: list[dict] = []
        self.keys: dict[str, tuple] = {}
        self.probes: dict[str, Any] = {}
        self.pending: dict[str, Any] = {}
        self.probe_pids: dict[str, int] = {}
        self.probe_cpu_s: dict[str, float] = {}
        self.probe_cpu_first: dict[str, float] = {}
        self.retry_at: dict[str, float] = {}  # a node whose probe died is retried after RETRY_S
        self.errors = 0
        self.thread_cpu_s = 0.0
        self.started_at = self.ended_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_index = 0
        self._probe_class = None

    def __enter__(self) -> UsageSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> UsageSampler:
        import ray

        self.started_at = time.time()
        if not ray.is_initialized():
            log.warning("usage sampler: Ray is not initialized; nothing will be sampled")
            return self
        self._thread = threading.Thread(target=self._loop, name="rayline-usage", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        """Stops sampling, kills the probes; returns the summary. Never raises."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + self.wait_s + 30)
        self.ended_at = time.time()
        for node_id in list(self.probes):
            self._drop(node_id)
        try:
            return self.summary()
        except Exception:  # noqa: BLE001 - a summary must never fail the run
            log.warning("usage sampler: summary failed", exc_info=True)
            return {"seconds": self.ended_at - self.started_at, "by_type": [], "nodes": []}

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """True once every alive node's probe has answered twice (so CPU rates exist)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            answered = {s["node_id"] for s in list(self.samples) if s.get("cpu_busy") is not None}
            if self.probes and set(self.probes) <= answered:
                return True
            time.sleep(0.1)
        return False

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.thread_time()
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - sampling is best-effort
                self._error("usage sampler: a sample failed")
            self.thread_cpu_s += time.thread_time() - began
            self._stop.wait(self.interval_s)

    def _tick(self) -> None:
        import ray
        from ray._private.state import available_resources_per_node
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from jobs.run_cost import node_records

        records = {r["node_id"]: r for r in node_records() if r["end_ms"] is None}
        for node_id in [n for n in self.probes if n not in records]:
            self._drop(node_id)  # the node left the cluster
        if self._probe_class is None:
            self._probe_class = ray.remote(num_cpus=0, max_restarts=0)(_Probe)
        probe_class = self._probe_class
        for node_id, record in records.items():
            self.keys.setdefault(node_id, node_key(record))
            if node_id not in self.probes and self.retry_at.get(node_id, 0) <= time.time():
                strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
                self.probes[node_id] = probe_class.options(scheduling_strategy=strategy).remote()
            if node_id in self.probes and node_id not in self.pending:
                self.pending[node_id] = self.probes[node_id].sample.remote()
        available = available_resources_per_node()  # logical, per alive node, from the GCS
        refs = list(self.pending.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.wait_s) if refs else ([], [])
        ready = set(ready)
        now, tick = time.time(), self._tick_index
        self._tick_index += 1
        for node_id, record in records.items():
            total = record["resources"]
            free = available.get(node_id, {})
            sample = {
                "t": now,
                "tick": tick,
                "node_id": node_id,
                "cpus": float(total.get("CPU", 0)),
                "gpus": float(total.get("GPU", 0)),
                "reserved_cpus": float(total.get("CPU", 0)) - float(free.get("CPU", 0)),
                "reserved_gpus": float(total.get("GPU", 0)) - float(free.get("GPU", 0)),
            }
            ref = self.pending.get(node_id)
            if ref is not None and ref in ready:
                del self.pending[node_id]
                try:
                    sample.update(ray.get(ref, timeout=0))
                except ray.exceptions.RayActorError:  # the probe (or its node) died
                    self._drop(node_id)
                    self.retry_at[node_id] = now + RETRY_S
                except Exception:  # noqa: BLE001 - one node's failure is not the run's
                    self._error(f"usage sampler: probe on node {node_id} failed")
                if "pid" in sample:  # the probe's CPU since its first answer (not its start)
                    self.probe_pids[node_id] = sample.pop("pid")
                    spent = sample.pop("probe_cpu_s")
                    self.probe_cpu_first.setdefault(node_id, spent)
                    self.probe_cpu_s[node_id] = spent - self.probe_cpu_first[node_id]
            self.samples.append(sample)

    def _error(self, message: str) -> None:
        """Counts a failure; logs the first few with a traceback, the rest quietly."""
        self.errors += 1
        level = logging.WARNING if self.errors <= 3 else logging.DEBUG
        log.log(level, message, exc_info=self.errors <= 3)

    def _drop(self, node_id: str) -> None:
        import ray

        probe = self.probes.pop(node_id, None)
        self.pending.pop(node_id, None)
        if probe is not None:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(probe, no_restart=True)

    def summary(self) -> dict:
        """Per node and per node type (node_type, instance, market as in the cost report)."""
        ended = self.ended_at or time.time()
        hosts: dict[str, set] = {}
        for sample in self.samples:
            if "host" in sample:
                hosts.setdefault(sample["host"], set()).add(sample["node_id"])
        shared = {n for nodes in hosts.values() if len(nodes) > 1 for n in nodes}
        by_node: dict[str, list[dict]] = {}
        for sample in self.samples:
            alone = sample["node_id"] not in shared
            cpu, memory = (
                ("host_cpu_busy", "host_memory_bytes") if alone else ("cpu_busy", "memory_bytes")
            )
            rated = sample.get("cpu_busy") is not None  # a probe's first answer has no rate
            view = {**sample, "busy": sample[cpu] if rated else None, "memory": sample.get(memory)}
            view["basis"] = "host" if alone else "ray-processes"
            by_node.setdefault(sample["node_id"], []).append(view)
        unknown = ("local", None, "unknown")
        nodes = [
            {"node_id": n, **_figures(self.keys.get(n, unknown), samples)}
            for n, samples in by_node.items()
        ]
        groups: dict[tuple, list[dict]] = {}
        for node_id, samples in by_node.items():
            groups.setdefault(self.keys.get(node_id, unknown), []).extend(samples)
        by_type = [_type_figures(key, samples) for key, samples in groups.items()]
        return {
            "interval_s": self.interval_s,
            "started_at": self.started_at,
            "ended_at": ended,
            "seconds": ended - self.started_at,
            "errors": self.errors,
            "overhead": {
                "driver_thread_cpu_s": self.thread_cpu_s,
                "probe_cpu_s": sum(self.probe_cpu_s.values()),
                "probes": len(self.probe_cpu_s),
            },
            "by_type": by_type,
            "nodes": nodes,
        }


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _figures(key: tuple, samples: list[dict]) -> dict:
    """Pooled figures of samples of one node or one type: what one node of it needs."""
    node_type, instance, market = key
    busy = [s["busy"] for s in samples if s["busy"] is not None]
    ray_busy = [s["cpu_busy"] for s in samples if s.get("cpu_busy") is not None]
    gpu = [s["gpu_busy"] for s in samples if s.get("gpu_busy") is not None]
    memory = [s["memory"] for s in samples if s["memory"] is not None]
    ray_memory = [s["memory_bytes"] for s in samples if "memory_bytes" in s]
    times = [s["t"] for s in samples]
    bases = {s["basis"] for s in samples if "host" in s}
    return {
        "node_type": node_type,
        "instance": instance,
        "market": market,
        "basis": "host" if bases == {"host"} else "ray-processes",
        "samples": len(busy),
        "seconds": max(times) - min(times),
        "cpus": max(s["cpus"] for s in samples),
        "gpus": max(s["gpus"] for s in samples),
        "cpu_busy_mean": _mean(busy),
        "cpu_busy_p95": _p95(busy),
        "memory_peak_bytes": max(memory, default=None),
        "ray_cpu_busy_mean": _mean(ray_busy),
        "ray_cpu_busy_p95": _p95(ray_busy),
        "ray_cpu_busy_peak": max(ray_busy, default=None),
        "ray_memory_peak_bytes": max(ray_memory, default=None),
        "host_memory_total_bytes": max(s.get("host_memory_total_bytes", 0) for s in samples),
        "reserved_cpus_peak": max(s["reserved_cpus"] for s in samples),
        "reserved_gpus_peak": max(s["reserved_gpus"] for s in samples),
        "gpu_busy_mean": _mean(gpu),
        "gpu_busy_p95": _p95(gpu),
        "gpu_memory_peak_bytes": max(s.get("gpu_memory_bytes", 0) for s in samples) or None,
    }


def _type_figures(key: tuple, samples: list[dict]) -> dict:
    """A type's pooled figures plus totals over its nodes at each tick: what the type as a whole
    needs (the input to 'fewer workers')."""
    ticks: dict[int, dict] = {}
    for s in samples:
        tick = ticks.setdefault(s["tick"], {"nodes": 0, "busy": 0.0, "memory": 0.0, "cpus": 0.0})
        tick["nodes"] += 1
        tick["cpus"] += s["reserved_cpus"]
        tick["busy"] += s["busy"] or 0.0
        tick["memory"] += s["memory"] or 0.0
    return {
        **_figures(key, samples),
        "nodes": len({s["node_id"] for s in samples}),
        "nodes_peak": max(t["nodes"] for t in ticks.values()),
        "total_cpu_busy_p95": _p95([t["busy"] for t in ticks.values()]),
        "total_memory_peak_bytes": max(t["memory"] for t in ticks.values()),
        "total_reserved_cpus_peak": max(t["cpus"] for t in ticks.values()),
    }
