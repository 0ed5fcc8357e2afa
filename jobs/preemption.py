"""Spot preemption inside a distributed fit: just-in-time checkpoints and an honest ledger.

A cloud's interruption notice (AWS gives two minutes, GCP thirty seconds) reaches Ray as a
drain with reason PREEMPTION and a deadline (`jobs.spot_watcher` sends it on real nodes;
`ray drain-node` does by hand). Ray Train 2.60 sees the drain and answers
`ray.train.get_preemption_info()` on every worker; `JustInTimeCheckpoint` asks every few
rounds and, on the first notice, has rank 0 report a checkpoint at once, so the restarted run
resumes from that round rather than from the last periodic checkpoint.

`get_preemption_info` is a barrier across the workers, so it is asked on a fixed round
schedule (every worker runs the same rounds: XGBoost's allreduce keeps them in step).

`InterruptionLedger` lives on the driver's node (it survives the workers) and counts what an
interruption cost: attempts, just-in-time checkpoints, and the rounds trained twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray
import xgboost as xgb


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


class JustInTimeCheckpoint(xgb.callback.TrainingCallback):
    """Every `every` rounds: tells the ledger (rank 0) and asks Ray Train for a preemption
    notice (all ranks); on the first notice, `checkpoint(model, evals_log)` is called on every
    rank (the caller's report: rank 0 attaches the checkpoint), unless a periodic checkpoint was
    written at this very round, and training goes on until the node goes.
    """

    def __init__(
        self,
        every: int,
        rank: int,
        ledger,
        checkpoint: Callable[[xgb.Booster, dict], None],
        periodic_every: int,
    ) -> None:
        self.every, self.rank, self.ledger, self.checkpoint = every, rank, ledger, checkpoint
        self.periodic_every = periodic_every
        self.saved = False

    def after_iteration(self, model, epoch, evals_log) -> bool:
        import ray.train

        rounds = model.num_boosted_rounds()
        if self.rank == 0 and self.ledger is not None:
            self.ledger.reached.remote(rounds)
        if rounds % self.every or self.saved:
            return False
        notice = ray.train.get_preemption_info()  # a barrier: every rank asks at this round
        if notice is not None:
            if rounds % self.periodic_every:
                self.checkpoint(model, evals_log)
            self.saved = True
            if self.rank == 0 and self.ledger is not None:
                self.ledger.just_in_time.remote(rounds, notice.deadline_ms)
        return False


def interruption_ledger():
    """A ledger on this (the driver's) node: it must outlive the workers' nodes."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(here, soft=False)
    return InterruptionLedger.options(scheduling_strategy=strategy).remote()
