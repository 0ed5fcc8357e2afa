"""Reading the cluster files rayline checks and prices with: YAML that fails in one line, and
cluster/prices.yaml checked entry by entry (a hand-edited price must never surface later as a
KeyError in a cost report)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from jobs.errors import ConfigError

PRICES = Path(__file__).resolve().parent.parent / "cluster" / "prices.yaml"
PRICE_KEYS = ("on_demand", "spot")
SPEC_KEYS = ("vcpus", "memory_gib", "gpus", "gpu_memory_gib")


def load_yaml(path: str | Path) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (is it a YAML file?)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {one_line_yaml(error)}") from None


def one_line_yaml(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(error, 'problem', None) or error}{where}"


def _number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def price_problems(prices: dict[str, Any]) -> list[str]:
    """One line per entry that is not a mapping with finite, non-negative prices and specs."""
    problems = []
    for cloud, table in prices.items():
        if cloud == "currency":
            continue
        if not isinstance(table, dict):
            problems.append(f"{cloud}: expected a mapping of instance types")
            continue
        for name, entry in table.items():
            if not isinstance(entry, dict):
                problems.append(f"{cloud}.{name}: expected a mapping with on_demand and spot")
                continue
            for key in PRICE_KEYS:
                if not _number(entry.get(key)):
                    problems.append(
                        f"{cloud}.{name}.{key} ({entry.get(key)!r}) must be a price in USD "
                        "per hour, a number >= 0"
                    )
            for key in SPEC_KEYS:
                if key in entry and not _number(entry[key]):
                    problems.append(f"{cloud}.{name}.{key} ({entry[key]!r}) must be a number >= 0")
    return problems


def load_prices(path: str | Path = PRICES) -> dict[str, Any]:
    prices = load_yaml(path)
    if not isinstance(prices, dict):
        raise ConfigError(f"{path}: expected a mapping with 'aws' and 'gcp' sections")
    problems = price_problems(prices)
    if problems:
        raise ConfigError("\n".join(f"{path}: {problem}" for problem in problems))
    return prices
