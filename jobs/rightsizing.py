"""Rightsizing: from a run's measured use per node type (jobs/usage.py), a cheaper way to run it.

A node type is under-used when its busy cores (p95 of the samples) stay below `cpu_fraction` of
its vCPUs and its peak memory below `memory_fraction` of its memory. The default one half
matches how instance families grow (each size doubles): below half, the next size down still
fits. p95 rather than the mean, so short bursts are kept, and the peak for memory, since running
out of memory kills a task where a lack of CPU only slows it. Runs shorter than
`min_window_s` (10 min) are not judged: start-up (image pull, Ray start, data loading) dominates
them and one sample more or less would move the answer.

For an under-used type that ran several nodes at once the advice is fewer workers (enough for the
type's total p95 cores and total peak memory with `headroom`); otherwise, the cheapest instance
type of the same cloud in cluster/prices.yaml whose vCPUs and memory cover p95 cores x headroom
and peak memory x headroom and that has at least as many GPUs (a GPU node is never moved to a
CPU-only type). Savings are priced at the market the node ran on.
"""

from __future__ import annotations

import math
from typing import Any

GIB = 1024**3
MIN_WINDOW_S = 600.0
MIN_SAMPLES = 30
CPU_FRACTION = 0.5
MEMORY_FRACTION = 0.5
HEADROOM = 1.25


def instance_specs(prices: dict) -> dict[str, dict]:
    """Instance type -> its prices.yaml entry plus `cloud`, for entries with vcpus and memory."""
    return {
        name: {**entry, "cloud": cloud}
        for cloud, table in prices.items()
        if isinstance(table, dict)
        for name, entry in table.items()
        if isinstance(entry, dict) and "vcpus" in entry and "memory_gib" in entry
    }


def hourly(entry: dict, market: str) -> float:
    """The entry's $/h at the market a node ran on (spot, else on-demand)."""
    return float(entry["spot"] if market == "spot" else entry["on_demand"])


def _cost_group(cost_report: dict, usage: dict) -> dict | None:
    for group in cost_report.get("by_type", []) if cost_report else []:
        if (group["node_type"], group["instance"], group["market"]) == (
            usage["node_type"], usage["instance"], usage["market"],
        ):  # fmt: skip
            return group
    return None


def _skip_reason(usage: dict, specs: dict, min_window_s: float, min_samples: int) -> str | None:
    """Why a type cannot be judged, or None if it can."""
    if usage.get("instance") not in specs or usage.get("market") not in ("spot", "on-demand"):
        return "unpriced"
    if usage.get("cpu_busy_p95") is None or usage.get("memory_peak_bytes") is None:
        return "unmeasured"
    if usage.get("seconds", 0) < min_window_s or usage.get("samples", 0) < min_samples:
        return "short"
    return None


def _cheapest_fit(spec: dict, specs: dict, market: str, cores: float, memory_gib: float):
    """The cheapest type of the same cloud covering cores, memory and the GPUs; None if none."""
    fits = [
        (hourly(entry, market), name)
        for name, entry in specs.items()
        if entry["cloud"] == spec["cloud"]
        and entry["vcpus"] >= cores
        and entry["memory_gib"] >= memory_gib
        and entry.get("gpus", 0) >= spec.get("gpus", 0)
    ]
    return min(fits) if fits else None


def recommend(
    usage_summary: dict,
    cost_report: dict,
    prices: dict,
    *,
    cpu_fraction: float = CPU_FRACTION,
    memory_fraction: float = MEMORY_FRACTION,
    headroom: float = HEADROOM,
    min_window_s: float = MIN_WINDOW_S,
    min_samples: int = MIN_SAMPLES,
) -> list[dict]:
    """One recommendation per under-used node type; an empty list when there is none.

    Args:
        usage_summary: `UsageSampler.stop()`'s summary (its `by_type` entries are used).
        cost_report: `CostReport.as_dict()` of the same run: node-hours turn $/h into the run's $.
        prices: `load_prices()`, with vcpus, memory_gib and gpus per instance type.
    """
    return rightsize(
        usage_summary, cost_report, prices, cpu_fraction=cpu_fraction,
        memory_fraction=memory_fraction, headroom=headroom, min_window_s=min_window_s,
        min_samples=min_samples,
    )["recommendations"]  # fmt: skip


def rightsize(
    usage_summary: dict,
    cost_report: dict,
    prices: dict,
    *,
    cpu_fraction: float = CPU_FRACTION,
    memory_fraction: float = MEMORY_FRACTION,
    headroom: float = HEADROOM,
    min_window_s: float = MIN_WINDOW_S,
    min_samples: int = MIN_SAMPLES,
) -> dict[str, Any]:
    """`{"recommendations": [...], "reason": str | None}`: the reason says why the list is empty
    ("run too short to judge: N s", "no node type under-used", "no priced node type")."""
    specs = instance_specs(prices)
    recommendations, skipped = [], []
    for usage in usage_summary.get("by_type", []):
        reason = _skip_reason(usage, specs, min_window_s, min_samples)
        if reason:
            skipped.append(reason)
            continue
        found = _recommend_type(usage, specs, headroom, cpu_fraction, memory_fraction)
        if found is None:
            continue
        group = _cost_group(cost_report, usage)
        node_hours = group["node_hours"] if group else None
        # $/h saved is for the type's peak node count; node-hours spread it over the run.
        per_node = found["dollars_per_hour_saved"] / max(usage.get("nodes_peak") or 1, 1)
        found["run_dollars_saved"] = None if node_hours is None else node_hours * per_node
        recommendations.append(found)
    reason = None
    if not recommendations:
        judged = len(skipped) < len(usage_summary.get("by_type", []))
        if judged:
            reason = "no node type under-used"
        elif "short" in skipped:
            reason = f"run too short to judge: {usage_summary.get('seconds', 0):.0f} s"
        elif skipped and all(s == "unpriced" for s in skipped):
            reason = "no priced node type (nodes without an instance type cannot be rightsized)"
        else:
            reason = "no usage measured"
    return {"recommendations": recommendations, "reason": reason}


def _recommend_type(usage: dict, specs: dict, headroom, cpu_fraction, memory_fraction):
    spec = specs[usage["instance"]]
    market = usage["market"]
    vcpus, memory_gib = float(spec["vcpus"]), float(spec["memory_gib"])
    p95_cores = usage["cpu_busy_p95"]
    peak_gib = usage["memory_peak_bytes"] / GIB
    if p95_cores >= cpu_fraction * vcpus or peak_gib >= memory_fraction * memory_gib:
        return None
    price = hourly(spec, market)
    common = {
        "node_type": usage["node_type"],
        "instance": usage["instance"],
        "market": market,
        "measured": {
            "cpu_busy_p95": p95_cores,
            "memory_peak_gib": round(peak_gib, 3),
            "vcpus": vcpus,
            "memory_gib": memory_gib,
            "reserved_cpus_peak": usage.get("reserved_cpus_peak"),
            "seconds": usage.get("seconds"),
        },
    }
    nodes = int(usage.get("nodes_peak") or 1)
    if nodes > 1:
        total_cores = (usage.get("total_cpu_busy_p95") or p95_cores * nodes) * headroom
        total_gib = (usage.get("total_memory_peak_bytes") or 0) / GIB * headroom
        needed = max(math.ceil(total_cores / vcpus), math.ceil(total_gib / memory_gib), 1)
        if needed < nodes:
            return {
                **common,
                "action": "fewer_workers",
                "workers": needed,
                "from_workers": nodes,
                "dollars_per_hour_saved": (nodes - needed) * price,
                "why": f"{nodes} nodes used p95 {usage.get('total_cpu_busy_p95', 0):.2f} cores "
                f"together: {needed} cover it with {headroom:g}x headroom",
                **_reservation_note(usage.get("total_reserved_cpus_peak"), needed * vcpus),
            }
    fit = _cheapest_fit(spec, specs, market, p95_cores * headroom, peak_gib * headroom)
    if fit is None or fit[1] == usage["instance"] or fit[0] >= price:
        return None
    new_price, name = fit
    return {
        **common,
        "action": "smaller_instance",
        "to_instance": name,
        "to_vcpus": specs[name]["vcpus"],
        "to_memory_gib": specs[name]["memory_gib"],
        "dollars_per_hour": price,
        "to_dollars_per_hour": new_price,
        "dollars_per_hour_saved": (price - new_price) * nodes,
        "why": f"p95 {p95_cores:.2f} of {vcpus:g} cores, peak {peak_gib:.1f} of "
        f"{memory_gib:g} GiB: {name} covers it with {headroom:g}x headroom",
        **_reservation_note(usage.get("reserved_cpus_peak"), float(specs[name]["vcpus"])),
    }


def _reservation_note(reserved: float | None, cpus_after: float) -> dict:
    """Ray schedules by reservation: a run that reserved more CPUs than the smaller cluster has
    must also ask for fewer (e.g. fewer training workers), or its tasks would not be placed."""
    if reserved and reserved > cpus_after:
        note = f"Ray reserved {reserved:g} CPUs at peak: lower the run's requests to {cpus_after:g}"
        return {"note": note}
    return {}
