"""Spot preemption inside a distributed fit: just-in-time checkpoints and an honest ledger.

A cloud's interruption notice (AWS gives two minutes, GCP thirty seconds) reaches Ray as a
drain with reason PREEMPTION and a deadline (`jobs.spot_watcher` sends it on real nodes;
`ray drain-node` does by hand). Ray Train 2.60 sees the drain and answers
`ray.train.get_preemption_info()` on every worker; `JustInTimeCheckpoint` asks every few
rounds and, on the first notice, has rank 0 report a checkpoint at once, so the restarted run
resumes from that round rather than from the last periodic checkpoint.

`get_preemption_info` is a barrier across the workers, so it is asked on a fixed round
schedule (every worker runs the same rounds: XGBoost's allreduce keeps them in step).

The ledger that counts what an interruption cost is in `jobs.interruptions` (an actor that
must not import XGBoost: it would add a second of start-up to every fit).
"""

from __future__ import annotations

from collections.abc import Callable

import xgboost as xgb


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
