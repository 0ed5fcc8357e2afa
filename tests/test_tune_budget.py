"""Tune's dollar budget: the stopper's arithmetic, ASHA's rungs, and a real search stopped by it.

The real search runs in a subprocess with a local Ray whose node carries the labels the cost
report prices by (the session's own Ray, in this process, has none): m6i.2xlarge on-demand at
$0.384/h, so a $0.003 budget lasts about 28 s of tuning (room for a slow start on a busy machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from jobs.config import TuneConfig
from jobs.run_cost import cost_report
from jobs.tune_runtime import BudgetWatch, Spend, _rungs, cluster_spend
from tests.conftest import ROOT


def test_spend_is_read_every_few_seconds_and_extrapolated_between():
    reads = []

    def read(started_at):
        reads.append(started_at)
        return Spend(dollars=0.0005, rate_per_hour=3.6, unpriced=None)  # $0.001 per second

    watch = BudgetWatch(0.002, started_at=100.0, every_s=5.0, read=read)
    assert watch.spent(now=1000.0).dollars == pytest.approx(0.0005)
    assert watch.spent(now=1001.0).dollars == pytest.approx(0.0015)  # not read again
    assert len(reads) == 1 and not watch.reached
    assert watch.over(now=1002.0) and watch.over()  # $0.0025 >= $0.002; it stays reached
    assert len(reads) == 1


def test_unpriced_nodes_make_spend_unknown_and_warn_once():
    records = [
        {
            "node_id": "a" * 8,
            "is_head": True,
            "labels": {},
            "instance_type": None,
            "node_type": None,
            "resources": {"CPU": 2.0},
            "start_ms": 0,
            "end_ms": None,
            "death_reason": None,
            "death_message": "",
        }
    ]
    spend = cluster_spend(10.0, cost_report(10.0, ended_at=3610.0, records=records))
    assert spend.dollars == 0 and "cannot be priced" in spend.unpriced

    watch = BudgetWatch(1.0, started_at=10.0, every_s=0.0, read=lambda _: spend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not watch.over() and not watch.over()
    assert [str(w.message) for w in caught] == [
        f"tune.budget_usd=1.0 cannot bind: spend is unknown, {spend.unpriced}"
    ]
    assert watch.summary() == {"budget_usd": 1.0, "spent_usd": None, "spend_note": spend.unpriced}


def test_trials_report_exactly_at_ashas_rungs():
    from ray.tune.schedulers import ASHAScheduler

    for rounds, grace, factor in [(50, 10, 3), (30, 5, 3), (90, 10, 3), (100, 1, 4), (7, 7, 2)]:
        cfg = TuneConfig(num_boost_round=rounds, grace_period=grace, reduction_factor=factor)
        asha = ASHAScheduler(
            time_attr="rounds", max_t=rounds, grace_period=grace, reduction_factor=factor
        )
        assert _rungs(cfg) == {milestone for milestone, _ in asha._brackets[0]._rungs}
    assert _rungs(TuneConfig(asha=False)) == set()


LABELLED_DRIVER = textwrap.dedent(
    """
    import json, sys
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             labels={"ray.io/market-type": "on-demand", "rayline.io/instance-type": "m6i.2xlarge"})
    from jobs.tune import tune_model
    from tests.conftest import make_config
    storage, run, budget = sys.argv[1:4]
    config = make_config("d", storage, **{
        "tune.budget_usd": float(budget), "tune.num_samples": 10_000, "tune.num_boost_round": 10,
        "tune.grace_period": 5, "tune.max_concurrent": 2,
    })
    result = tune_model(config, run, restore=False)
    print("RESULT " + json.dumps({k: v for k, v in vars(result).items() if k != "table"}))
    """
)


@pytest.mark.slow
def test_a_search_on_a_priced_node_stops_at_its_dollar_budget(pipeline_run, tmp_path):
    config, result = pipeline_run
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(Path(result.run_uri) / "features", run / "features")
    budget = 0.003  # m6i.2xlarge on-demand: $0.384/h, so ~28 s
    done = subprocess.run(
        [sys.executable, "-c", LABELLED_DRIVER, str(config.storage), str(run), str(budget)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    tuned = json.loads(line.removeprefix("RESULT "))
    assert tuned["stopped_by"] == "budget", tuned
    assert 1 <= tuned["trials"] < 10_000
    assert tuned["budget_usd"] == budget and tuned["spend_note"] is None
    # Spent: the budget, plus the seconds Tune takes to stop its trials and save its state.
    assert budget <= tuned["spent_usd"] <= budget + 0.384 * 8 / 3600, tuned
    assert "cannot bind" not in done.stderr
    saved = json.loads((run / "tune" / "results.json").read_text())
    assert saved["spent_usd"] == tuned["spent_usd"] and saved["stopped_by"] == "budget"
