"""What spot interruptions cost a distributed fit: attempts, just-in-time checkpoints, and the
rounds trained twice. The ledger is an actor pinned to the driver's node, so it outlives the
workers' nodes; it imports neither XGBoost nor Ray Train (it starts with every fit)."""

from __future__ import annotations

import time

import ray


@ray.remote(num_cpus=0, max_restarts=0)
class InterruptionLedger:
    """Rounds each attempt reached and where the next one resumed; read once at the end."""

    def __init__(self) -> None:
        self.attempts: list[dict] = []

    def start(self, resumed_from: int) -> None:
        self.attempts.append(
            {"resumed_from": resumed_from, "reached": resumed_from, "jit_round": None}
        )

    def reached(self, rounds: int) -> None:
        if self.attempts:
            self.attempts[-1]["reached"] = max(self.attempts[-1]["reached"], rounds)

    def just_in_time(self, rounds: int, deadline_ms: int | None) -> None:
        if self.attempts:
            self.attempts[-1]["jit_round"] = rounds
            self.attempts[-1]["deadline_in_s"] = (
                None if deadline_ms is None else round(deadline_ms / 1000 - time.time(), 3)
            )

    def summary(self) -> dict:
        return summarize(self.attempts)


def summarize(attempts: list[dict]) -> dict:
    """Interruptions = attempts after the first; rounds redone = rounds an attempt reached
    beyond the round the next attempt resumed from (work lost with the node)."""
    redone = sum(
        max(0, attempt["reached"] - following["resumed_from"])
        for attempt, following in zip(attempts, attempts[1:], strict=False)
    )
    return {
        "attempts": len(attempts),
        "interruptions": max(0, len(attempts) - 1),
        "rounds_redone": redone,
        "just_in_time_checkpoints": sum(a["jit_round"] is not None for a in attempts),
        "just_in_time_rounds": [a["jit_round"] for a in attempts if a["jit_round"] is not None],
        "resumed_from": [a["resumed_from"] for a in attempts[1:]],
    }


def interruption_ledger():
    """A ledger on this (the driver's) node: it must outlive the workers' nodes."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(here, soft=False)
    return InterruptionLedger.options(scheduling_strategy=strategy).remote()
