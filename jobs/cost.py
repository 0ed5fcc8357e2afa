"""`rayline cost estimate FILE`: what a `ray up` cluster costs per hour and in total, spot
against on-demand, from the approximate list prices in cluster/prices.yaml."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from jobs.cluster import INSTANCE_KEY, MARKET_LABEL, PRICES, load_prices, load_yaml, validate
from jobs.errors import ConfigError

app = typer.Typer(help="Cost of a cluster config, from cluster/prices.yaml.", no_args_is_help=True)


def estimate(
    path: str | Path, workers: int, hours: float, prices_path: str | Path = PRICES
) -> list[dict]:
    """Per worker type: hourly and total cost of the head, every type's `min_workers` (they run
    whenever the cluster is up) and `workers` of that type, at each node's own market price and
    all at on-demand prices. A type whose `max_workers` is below `workers` is left out."""
    problems = validate(path, prices_path)
    if problems:
        raise ConfigError("\n".join([f"{path} does not validate:", *problems]))
    if not math.isfinite(hours):
        raise ConfigError(f"--hours must be a finite number of hours, got {hours}")
    config, prices = load_yaml(path), load_prices(prices_path)
    if workers > config["max_workers"]:
        raise ConfigError(
            f"{path}: --workers {workers} is more than the cluster's max_workers "
            f"({config['max_workers']})"
        )
    cloud = config["provider"]["type"]
    key, table = INSTANCE_KEY[cloud], prices[cloud]
    head = config["head_node_type"]
    types = config["available_node_types"]

    def hourly_of(spec: dict, count: int, at_on_demand: bool = False) -> float:
        entry = table[spec["node_config"][key]]
        spot = spec["labels"][MARKET_LABEL] == "spot" and not at_on_demand
        return count * (entry["spot"] if spot else entry["on_demand"])

    # The head and every type's min_workers run whenever the cluster is up.
    always = {
        name: 1 if name == head else spec.get("min_workers", 0) for name, spec in types.items()
    }
    rows = []
    for name, spec in types.items():
        if name == head or workers > spec.get("max_workers", workers):
            continue  # a type that cannot have that many workers is not a cluster that exists
        market = spec["labels"][MARKET_LABEL]
        counts = {**always, name: max(workers, always[name])}
        hourly = sum(hourly_of(types[t], n) for t, n in counts.items())
        on_demand = sum(hourly_of(types[t], n, at_on_demand=True) for t, n in counts.items())
        rows.append(
            {
                "node_type": name,
                "instance": spec["node_config"][key],
                "market": market,
                "hourly": hourly,
                "total": hourly * hours,
                "on_demand_hourly": on_demand,
                "on_demand_total": on_demand * hours,
                "saving": 1 - hourly / on_demand if on_demand else 0.0,
            }
        )
    return rows


@app.command("estimate")
def estimate_command(
    file: Annotated[Path, typer.Argument(help="`ray up` YAML")],
    workers: Annotated[int, typer.Option(min=0, help="Workers of one type, besides the head")] = 2,
    hours: Annotated[float, typer.Option(min=0, help="Hours the cluster runs")] = 1.0,
) -> None:
    """Hourly and total cost of the head plus N workers of each type, spot vs on-demand
    (approximate list prices from cluster/prices.yaml)."""
    rows = estimate(file, workers, hours)
    typer.echo(
        f"{file}: head + min_workers + {workers} workers of one type for {hours:g} h "
        "(approximate list prices, USD; types with max_workers < workers left out)"
    )
    typer.echo(
        f"{'node type':<20} {'instance':<15} {'market':<10} {'$/h':>8} {'total':>9} "
        f"{'on-demand $/h':>14} {'on-demand total':>16} {'saving':>7}"
    )
    for r in rows:
        typer.echo(
            f"{r['node_type']:<20} {r['instance']:<15} {r['market']:<10} {r['hourly']:>8.3f} "
            f"{r['total']:>9.2f} {r['on_demand_hourly']:>14.3f} {r['on_demand_total']:>16.2f} "
            f"{r['saving']:>7.0%}"
        )
