"""The run cost report: node-hours inside the run's window, priced by instance type and market
from cluster/prices.yaml; interruptions told apart by how the node died. The numbers are
worked out here by hand from the prices file, not by the code under test."""

from __future__ import annotations

import pytest

from jobs.cluster import load_prices
from jobs.run_cost import cost_report

HOUR = 3600.0
T0 = 1_800_000_000.0  # the run starts here (epoch seconds)


def node(node_id, start_h, end_h=None, labels=None, reason=None, head=False, instance=None):
    return {
        "node_id": node_id,
        "is_head": head,
        "labels": labels or {},
        "instance_type": instance,
        "node_type": None,
        "resources": {"CPU": 8.0},
        "start_ms": int((T0 + start_h * HOUR) * 1000),
        "end_ms": None if end_h is None else int((T0 + end_h * HOUR) * 1000),
        "death_reason": reason,
        "death_message": "",
    }


def spot(instance):
    return {"ray.io/market-type": "spot", "rayline.io/instance-type": instance}


def on_demand(instance):
    return {"ray.io/market-type": "on-demand", "rayline.io/instance-type": instance}


def test_node_hours_are_clipped_to_the_run_and_priced_by_market():
    aws = load_prices()["aws"]
    records = [
        node("head", -5, labels=on_demand("m6i.xlarge"), head=True),  # started before the run
        node("a", 0.5, labels=spot("m6i.2xlarge")),  # joined half an hour in
        node("b", 0, 1, labels=spot("c6i.2xlarge"), reason="AUTOSCALER_DRAIN_PREEMPTED"),
        node("c", 0, 0.5, labels=spot("m5.2xlarge"), reason="UNEXPECTED_TERMINATION"),
        node("d", 1, 1.5, labels=spot("m5.2xlarge"), reason="AUTOSCALER_DRAIN_IDLE"),
        node("e", -3, -1, labels=spot("m5.2xlarge"), reason="UNEXPECTED_TERMINATION"),  # before
        node("f", 0, labels=on_demand("m6i.2xlarge")),
    ]
    report = cost_report(T0, T0 + 2 * HOUR, records=records)

    expected = {
        "head": 2 * aws["m6i.xlarge"]["on_demand"],
        "a": 1.5 * aws["m6i.2xlarge"]["spot"],
        "b": 1 * aws["c6i.2xlarge"]["spot"],
        "c": 0.5 * aws["m5.2xlarge"]["spot"],
        "d": 0.5 * aws["m5.2xlarge"]["spot"],
        "f": 2 * aws["m6i.2xlarge"]["on_demand"],
    }
    by_node = {n.node_id: n for n in report.nodes}
    assert set(by_node) == set(expected)  # e lived and died before the run
    for node_id, dollars in expected.items():
        assert by_node[node_id].dollars == pytest.approx(dollars)
    assert report.dollars == pytest.approx(sum(expected.values()))
    on_demand_total = (
        2 * aws["m6i.xlarge"]["on_demand"]
        + 1.5 * aws["m6i.2xlarge"]["on_demand"]
        + 1 * aws["c6i.2xlarge"]["on_demand"]
        + 1.0 * aws["m5.2xlarge"]["on_demand"]
        + 2 * aws["m6i.2xlarge"]["on_demand"]
    )
    assert report.on_demand_dollars == pytest.approx(on_demand_total)
    assert report.saving == pytest.approx(1 - report.dollars / on_demand_total)
    # A drain for preemption is a notice; a spot node gone without one is a loss; an idle
    # node the autoscaler removed is no interruption.
    assert report.interruptions == {"preempted_with_notice": 1, "lost_without_notice": 1}
    groups = {(g["instance"], g["market"]): g for g in report.by_type}
    assert groups[("m5.2xlarge", "spot")]["nodes"] == 2
    assert groups[("m5.2xlarge", "spot")]["node_hours"] == pytest.approx(1.0)
    assert report.unpriced_node_hours == 0


def test_nodes_without_an_instance_type_are_counted_not_priced():
    records = [
        node("laptop", -1, head=True),  # a local Ray: no labels
        node("gpu", 0, labels=spot("no-such-type")),  # a type the prices file lacks
        node("auto", 0, instance="n2-standard-8", labels={"ray.io/market-type": "spot"}),
    ]
    report = cost_report(T0, T0 + HOUR, records=records)
    assert report.unpriced_node_hours == pytest.approx(2.0)
    gcp = load_prices()["gcp"]
    assert report.dollars == pytest.approx(gcp["n2-standard-8"]["spot"])  # autoscaler's type
    assert {n.node_id: n.market for n in report.nodes}["laptop"] == "unknown"


def test_cost_of_a_local_run_is_recorded_in_the_bundle(pipeline_run):
    """The embedded local Ray: one unpriced node that lived through the run."""
    from jobs.registry import load_bundle
    from jobs.storage import Storage, join

    config, result = pipeline_run
    assert result.cost["unpriced_node_hours"] > 0
    assert result.cost["dollars"] == 0
    bundle = load_bundle(Storage(config.s3), join(config.storage, "registry"), config.name)
    assert bundle.lineage["cost"]["unpriced_node_hours"] == pytest.approx(
        result.cost["unpriced_node_hours"]
    )
    # The usage sampler ran through the run and reports the local node (its probe may not
    # have answered yet on a short run on a busy machine: tests/test_rightsizing.py checks
    # the samples themselves).
    measured = result.cost["usage"]["by_type"]
    assert [(m["node_type"], m["market"]) for m in measured] == [("head", "unknown")], measured
    assert result.cost["usage"]["seconds"] > 0
    # A local node has no instance type: nothing to rightsize, and the reason says so.
    assert result.cost["rightsizing"]["recommendations"] == []
    assert result.cost["rightsizing"]["reason"]
    window = result.cost["ended_at"] - result.cost["started_at"]
    assert window > sum(v for k, v in result.seconds.items() if k != "reference") * 0.9


def test_a_drained_node_that_is_then_powered_off_had_notice():
    """The cloud powers a drained node off at the deadline: the GCS records an unexpected
    death, but the drain seen during the run (DrainWatch) makes it an interruption with notice."""
    records = [
        node("a", 0, 1, labels=spot("m6i.2xlarge"), reason="UNEXPECTED_TERMINATION"),
        node("b", 0, 1, labels=spot("m6i.2xlarge"), reason="UNEXPECTED_TERMINATION"),
    ]
    report = cost_report(T0, T0 + 2 * HOUR, records=records, drained={"a"})
    assert report.interruptions == {"preempted_with_notice": 1, "lost_without_notice": 1}


def test_a_market_label_typo_is_not_priced_as_on_demand():
    labels = {"ray.io/market-type": "Spot", "rayline.io/instance-type": "m6i.2xlarge"}
    records = [node("a", 0, 1, labels=labels, reason="UNEXPECTED_TERMINATION")]
    report = cost_report(T0, T0 + HOUR, records=records)
    assert report.dollars == 0 and report.unpriced_node_hours == pytest.approx(1.0)
    assert report.nodes[0].market == "unknown"


def test_a_drained_on_demand_node_that_crashed_is_no_spot_interruption():
    records = [node("od", 0, 1, labels=on_demand("m6i.2xlarge"), reason="UNEXPECTED_TERMINATION")]
    assert cost_report(T0, T0 + HOUR, records=records, drained={"od"}).interruptions == {}


def test_a_failing_cost_report_never_fails_the_run(monkeypatch, caplog):
    """The model was trained and evaluated: a GCS or prices problem becomes an `error` entry."""
    from jobs import pipeline

    def unreachable(*args, **kwargs):
        raise RuntimeError("GCS timed out\nsecond line")

    monkeypatch.setattr(pipeline, "cost_report", unreachable)
    cost = pipeline.run_cost(T0, usage=None, drains=None)
    assert cost["error"] == "RuntimeError: GCS timed out"
    assert "run cost not computed" in caplog.text
