"""What Tune calls while it runs: the trial function in the trial actors, and the dollar budget.

Trials: each trial's actor builds the QuantileDMatrix pair once (Tune reuses actors, so later
trials skip the quantile sketch) from arrays that reach it once through the object store
(`tune.with_parameters`), and reports to Tune only at ASHA's rungs and at the end.

Budget: a Ray Tune `Stopper` ends the search when the cluster has spent `tune.budget_usd`.
Spend is what `jobs.run_cost.cost_report` prices for the cluster since tuning started: every
node's hours in that window at its instance type's price (labels `rayline.io/instance-type` and
`ray.io/market-type`, prices from cluster/prices.yaml). Reading the GCS costs ~10-30 ms, so the
stopper reads it at most every `CHECK_EVERY_S` seconds and in between extrapolates the last
reading at the burn rate of the nodes that were alive then: Tune asks `stop_all()` every step
(~0.1 s), and a budget of a few seconds of one node is still met to within a step.

A node that cannot be priced (a local Ray has no instance-type label) makes spend unknown: one
warning line says so, the result records `spent_usd: None` with the reason, and the budget binds
only if the nodes that are priced have spent it on their own.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import xgboost as xgb

from jobs.config import LOWER_IS_BETTER, TuneConfig

CHECK_EVERY_S = 2.0  # how often the stopper reads the GCS; between reads it extrapolates


class _Report(xgb.callback.TrainingCallback):
    """Reports the best validation metric so far (what early stopping keeps) at `milestones`
    (ASHA's rungs, the only rounds ASHA looks at) and when training ends.

    A function trainable's report blocks its thread until the driver has processed it, so each
    report costs a round trip: reporting every 5 rounds instead cost ~3 s (~20%) of a search of
    16 trials x 50 rounds on 2 busy cores (docs/benchmarks.md). Reporting the best so far, not
    the last round, makes a trial's score the booster's `best_score`, as plain xgboost reports.
    """

    def __init__(self, metric: str, milestones: set[int]):
        self.metric, self.milestones, self.best = metric, milestones, None
        self.better = (lambda a, b: a < b) if metric in LOWER_IS_BETTER else (lambda a, b: a > b)

    def _report(self, model) -> None:
        from ray import tune

        tune.report({f"valid_{self.metric}": self.best, "rounds": model.num_boosted_rounds()})

    def after_iteration(self, model, epoch, evals_log) -> bool:
        value = float(evals_log["valid"][self.metric][-1])
        if self.best is None or self.better(value, self.best):
            self.best = value
        if model.num_boosted_rounds() in self.milestones:
            self._report(model)
        return False

    def after_training(self, model):
        if self.best is not None and model.num_boosted_rounds() not in self.milestones:
            self._report(model)
        return model


def _rungs(tune_cfg: TuneConfig) -> set[int]:
    """The rounds at which ASHA compares trials (as `ray.tune.schedulers.ASHAScheduler` places
    them: grace_period x reduction_factor^k up to num_boost_round); none without ASHA."""
    if not tune_cfg.asha:
        return set()
    grace, factor = tune_cfg.grace_period, tune_cfg.reduction_factor
    count = int(np.log(tune_cfg.num_boost_round / grace) / np.log(factor) + 1)
    return {grace * factor**k for k in range(count)}


_matrices: dict = {}  # in a trial's process: (data token, max_bin) -> (dtrain, dvalid)


def _dmatrices(data: dict, max_bin: int | None, nthread: int | None) -> tuple:
    """The trial's QuantileDMatrix pair, built once per actor: Tune reuses actors, so later
    trials skip the quantile sketch (1-2 s per trial on 208k rows x 14 on a busy 2-core box)."""
    key = (data["token"], max_bin)
    if key not in _matrices:
        _matrices.clear()
        dtrain = xgb.QuantileDMatrix(
            data["x_train"],
            data["y_train"],
            weight=data["weights"],
            max_bin=max_bin,
            nthread=nthread,
        )
        dvalid = xgb.QuantileDMatrix(data["x_valid"], data["y_valid"], ref=dtrain)
        _matrices[key] = (dtrain, dvalid)
    return _matrices[key]


def _trial(
    params: dict, data: dict, base: dict, rounds: int, early: int, metric: str, rungs: set
) -> None:
    merged = {**base, **params}
    dtrain, dvalid = _dmatrices(data, merged.get("max_bin"), merged.get("nthread"))
    xgb.train(
        merged,
        dtrain,
        num_boost_round=rounds,
        evals=[(dvalid, "valid")],
        early_stopping_rounds=early,
        callbacks=[_Report(metric, rungs)],
        verbose_eval=False,
    )


@dataclass
class Spend:
    """What the cluster spent since `started_at`: dollars of priced nodes, $/h of those alive."""

    dollars: float
    rate_per_hour: float
    unpriced: str | None  # why spend is unknown (nodes without a price), else None


def cluster_spend(started_at: float, report=None) -> Spend:
    """Prices the cluster since `started_at` (epoch seconds) with `cost_report`."""
    from jobs.run_cost import cost_report

    report = report or cost_report(started_at)
    rate, unpriced = 0.0, []
    for node in report.nodes:
        if node.dollars is None:
            unpriced.append(f"{node.node_type} ({node.instance or 'no instance-type label'})")
        elif node.ended is None and node.hours > 0:
            rate += node.dollars / node.hours
    reason = None
    if unpriced:
        reason = (
            f"{len(unpriced)} node(s) cannot be priced: {', '.join(sorted(set(unpriced)))}; "
            "label them rayline.io/instance-type (a type in cluster/prices.yaml) and "
            "ray.io/market-type"
        )
    return Spend(float(report.dollars), rate, reason)


class BudgetWatch:
    """Dollars spent since `started_at`, read every `every_s` seconds and extrapolated between."""

    def __init__(
        self,
        budget_usd: float | None,
        started_at: float,
        every_s: float = CHECK_EVERY_S,
        read=cluster_spend,  # started_at -> Spend; tests pass their own
    ):
        self.budget_usd, self.started_at, self.every_s = budget_usd, started_at, every_s
        self.read = read
        self.last: Spend | None = None
        self.last_at = 0.0
        self.reached = False
        self.warned = False
        self.reads = 0

    def spent(self, now: float | None = None) -> Spend:
        now = time.time() if now is None else now
        if self.last is None or now - self.last_at >= self.every_s:
            self.last, self.last_at = self.read(self.started_at), now
            self.reads += 1
            if self.last.unpriced and self.budget_usd is not None and not self.warned:
                self.warned = True
                warnings.warn(
                    f"tune.budget_usd={self.budget_usd} cannot bind: spend is unknown, "
                    f"{self.last.unpriced}",
                    stacklevel=2,
                )
        hours = max(0.0, now - self.last_at) / 3600
        return Spend(
            self.last.dollars + self.last.rate_per_hour * hours,
            self.last.rate_per_hour,
            self.last.unpriced,
        )

    def over(self, now: float | None = None) -> bool:
        """True once the (known part of the) spend reaches the budget; it stays True."""
        if self.budget_usd is None or self.reached:
            return self.reached
        self.reached = self.spent(now).dollars >= self.budget_usd
        return self.reached

    def summary(self) -> dict:
        """`budget_usd`, `spent_usd` (None when unknown) and `spend_note` for the result."""
        final = self.read(self.started_at)
        return {
            "budget_usd": self.budget_usd,
            "spent_usd": None if final.unpriced else round(final.dollars, 6),
            "spend_note": final.unpriced,
        }


_watch: dict = {"current": None}  # the driver's BudgetWatch while fit() runs


def budget_stopper():
    """A Tune `Stopper` whose `stop_all()` is the current `BudgetWatch.over()`.

    Like the progress callback it is pickled into `tuner.pkl`, so it holds nothing and finds the
    watch through this module: a resumed search obeys the budget of the call that resumes it.
    """
    from ray.tune import Stopper

    class BudgetStopper(Stopper):
        def __reduce__(self):
            return budget_stopper, ()

        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            watch = _watch["current"]
            return watch is not None and watch.over()

    return BudgetStopper()
