"""What a run cost: node-hours by node type and market, priced with cluster/prices.yaml.

Ray's GCS keeps every node it has seen, dead ones included, with its labels, start and end
times and (for dead nodes) why it died. A run's window [start, end] overlapped with each node's
lifetime gives node-hours; the node's instance type and market give the price. The head counts
too: it is paid for whether it trains or not. On a cluster shared by several runs at once the
report overstates a run's share: it prices the whole cluster during the run.

Instance type: the label `rayline.io/instance-type` (the cluster configs set it), else the
instance type the autoscaler recorded for the node. Market: `ray.io/market-type`. A node with
neither (a laptop, a `ray start` without labels) is counted in node-hours but not priced.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs.cluster import INSTANCE_LABEL, MARKET_LABEL, MARKETS, PRICES, load_prices

PREEMPTED_REASONS = {"AUTOSCALER_DRAIN_PREEMPTED"}
UNEXPECTED_REASONS = {"UNEXPECTED_TERMINATION"}


@dataclass
class NodeUsage:
    """One node's share of a run."""

    node_id: str
    node_type: str
    instance: str | None
    market: str
    cpus: float
    gpus: float
    hours: float
    dollars: float | None
    on_demand_dollars: float | None
    ended: str | None = None  # why the node died during the run, if it did


@dataclass
class CostReport:
    """Dollars for a run, what the same node-hours cost on on-demand, and interruptions."""

    started_at: float
    ended_at: float
    nodes: list[NodeUsage] = field(default_factory=list)
    by_type: list[dict] = field(default_factory=list)
    dollars: float = 0.0
    on_demand_dollars: float = 0.0
    saving: float = 0.0
    unpriced_node_hours: float = 0.0
    interruptions: dict[str, int] = field(default_factory=dict)
    prices: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def node_records() -> list[dict[str, Any]]:
    """Every node the connected cluster's GCS knows, alive or dead, as plain dicts.

    Ray 2.60 has no public API for dead nodes' start/end times without the dashboard (which an
    embedded local Ray does not start), so this reads the GCS client the driver already holds.
    """
    from ray._private.worker import global_worker
    from ray.core.generated import common_pb2, gcs_pb2

    death = common_pb2.NodeDeathInfo.Reason
    records = []
    for info in global_worker.gcs_client.get_all_node_info(timeout=30).values():
        dead = info.state == gcs_pb2.GcsNodeInfo.GcsNodeState.DEAD
        records.append(
            {
                "node_id": info.node_id.hex(),
                "is_head": bool(info.is_head_node),
                "labels": dict(info.labels),
                "instance_type": info.instance_type_name or None,
                "node_type": info.node_type_name or None,
                "resources": dict(info.resources_total),
                "start_ms": int(info.start_time_ms),
                "end_ms": int(info.end_time_ms) if dead and info.end_time_ms else None,
                "death_reason": death.Name(info.death_info.reason) if dead else None,
                "death_message": info.death_info.reason_message if dead else "",
                "draining": info.state_snapshot.state == gcs_pb2.NodeSnapshot.State.DRAINING,
            }
        )
    return records


def _price_table(prices: dict) -> dict[str, dict]:
    """Instance type -> its entry, across clouds (the names do not collide)."""
    return {
        name: entry
        for cloud, table in prices.items()
        if isinstance(table, dict) and cloud != "currency"
        for name, entry in table.items()
        if isinstance(entry, dict)
    }


def node_usage(record: dict, started_at: float, ended_at: float, table: dict) -> NodeUsage | None:
    """The node's hours inside the run's window, priced; None if it lived outside it."""
    start = max(record["start_ms"] / 1000, started_at)
    end = min(record["end_ms"] / 1000 if record["end_ms"] else ended_at, ended_at)
    if end <= start:
        return None
    hours = (end - start) / 3600
    labels = record["labels"]
    instance = labels.get(INSTANCE_LABEL) or record["instance_type"]
    market = labels.get(MARKET_LABEL) or ("on-demand" if instance else "unknown")
    if market not in MARKETS:  # "Spot", "preemptible": a typo must not be priced as on-demand
        market = "unknown"
    entry = table.get(instance) if instance and market != "unknown" else None
    dollars = on_demand = None
    if entry is not None:
        on_demand = hours * float(entry["on_demand"])
        dollars = hours * float(entry["spot"]) if market == "spot" else on_demand
    ended = None
    if record["end_ms"] and record["end_ms"] / 1000 <= ended_at:
        ended = record["death_reason"]
    resources = record["resources"]
    return NodeUsage(
        node_id=record["node_id"],
        node_type=record["node_type"] or ("head" if record["is_head"] else instance or "local"),
        instance=instance,
        market=market,
        cpus=float(resources.get("CPU", 0)),
        gpus=float(resources.get("GPU", 0)),
        hours=hours,
        dollars=dollars,
        on_demand_dollars=on_demand,
        ended=ended,
    )


def interruption(node: NodeUsage, drained: set[str]) -> str | None:
    """How a node that died during the run went: after a drain (a cloud notice relayed by the
    spot watcher), or a spot node lost without notice; None for a node that lived on or that
    the autoscaler removed idle. A drained node the cloud then powers off dies "unexpectedly"
    in the GCS's eyes, so a drain seen during the run (`DrainWatch`) counts as the notice."""
    if node.ended in PREEMPTED_REASONS:
        return "preempted_with_notice"
    if node.ended in UNEXPECTED_REASONS and node.node_id in drained and node.market == "spot":
        return "preempted_with_notice"
    if node.ended in UNEXPECTED_REASONS and node.market == "spot":
        return "lost_without_notice"
    return None


class DrainWatch:
    """Notes, every `interval_s`, which nodes the GCS shows draining: the death record of a
    drained node that is then powered off does not say it had notice. Best effort: a failed
    look is skipped."""

    def __init__(self, interval_s: float = 2.0) -> None:
        self.interval_s, self.drained = interval_s, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rayline-drains", daemon=True)

    def __enter__(self) -> DrainWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.drained |= {r["node_id"] for r in node_records() if r["draining"]}
            except Exception:  # noqa: BLE001 - a cost detail must never fail a run
                continue


def cost_report(
    started_at: float,
    ended_at: float | None = None,
    records: list[dict] | None = None,
    prices_path: str | Path = PRICES,
    drained: set[str] | None = None,
) -> CostReport:
    """Prices the cluster's nodes between `started_at` and `ended_at` (epoch seconds)."""
    ended_at = ended_at if ended_at is not None else time.time()
    table = _price_table(load_prices(prices_path))
    records = node_records() if records is None else records
    nodes = [u for r in records if (u := node_usage(r, started_at, ended_at, table)) is not None]
    report = CostReport(started_at, ended_at, nodes, prices=str(prices_path))
    groups: dict[tuple, dict] = {}
    for node in nodes:
        key = (node.node_type, node.instance, node.market)
        group = groups.setdefault(
            key,
            {
                "node_type": node.node_type,
                "instance": node.instance,
                "market": node.market,
                "nodes": 0,
                "node_hours": 0.0,
                "dollars": None if node.dollars is None else 0.0,
                "on_demand_dollars": None if node.on_demand_dollars is None else 0.0,
            },
        )
        group["nodes"] += 1
        group["node_hours"] += node.hours
        kind = interruption(node, drained or set())
        if kind:
            report.interruptions[kind] = report.interruptions.get(kind, 0) + 1
        if node.dollars is None:
            report.unpriced_node_hours += node.hours
            continue
        group["dollars"] += node.dollars
        group["on_demand_dollars"] += node.on_demand_dollars
        report.dollars += node.dollars
        report.on_demand_dollars += node.on_demand_dollars
    report.by_type = list(groups.values())
    if report.on_demand_dollars:
        report.saving = 1 - report.dollars / report.on_demand_dollars
    return report
