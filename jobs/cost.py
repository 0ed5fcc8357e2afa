"""`rayline cost estimate FILE`: what a `ray up` cluster costs per hour and in total, spot
against on-demand, from the approximate list prices in cluster/prices.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jobs.cluster import INSTANCE_KEY, MARKET_LABEL, PRICES, load_prices, load_yaml, validate
from jobs.errors import ConfigError

app = typer.Typer(help="Cost of a cluster config, from cluster/prices.yaml.", no_args_is_help=True)


def estimate(
    path: str | Path, workers: int, hours: float, prices_path: str | Path = PRICES
) -> list[dict]:
    """Per worker type: hourly and total cost of the head plus `workers` of that type, at its
    own market's price and at on-demand prices."""
    problems = validate(path, prices_path)
    if problems:
        raise ConfigError("\n".join([f"{path} does not validate:", *problems]))
    config, prices = load_yaml(path), load_prices(prices_path)
    cloud = config["provider"]["type"]
    key, table = INSTANCE_KEY[cloud], prices[cloud]
    head = config["head_node_type"]
    head_price = table[config["available_node_types"][head]["node_config"][key]]["on_demand"]
    rows = []
    for name, spec in config["available_node_types"].items():
        if name == head:
            continue
        entry = table[spec["node_config"][key]]
        market = spec["labels"][MARKET_LABEL]
        price = entry["spot"] if market == "spot" else entry["on_demand"]
        hourly = head_price + workers * price
        on_demand = head_price + workers * entry["on_demand"]
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
    typer.echo(f"{file}: head + {workers} workers for {hours:g} h (approximate list prices, USD)")
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
