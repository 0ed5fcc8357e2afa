"""Rich summaries printed at the end of each stage and of a whole pipeline run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from jobs.metrics import HEADLINE

console = Console()


def print_ingest(result) -> None:
    table = Table(title="ingest + validate", title_justify="left")
    for column in ("source", "files", "rows in", "rows out", "quarantined", "top reasons"):
        table.add_column(
            column, justify="right" if column.startswith(("rows", "quar", "files")) else "left"
        )
    for report in result.sources.values():
        reasons = sorted(report.reasons.items(), key=lambda item: -item[1])[:3]
        files = f"{report.files}" + (f" ({len(report.bad_files)} bad)" if report.bad_files else "")
        table.add_row(
            report.name,
            files,
            f"{report.rows_in:,}",
            f"{report.rows_out:,}",
            f"{report.rows_quarantined:,}",
            ", ".join(f"{r} x{n}" for r, n in reasons),
        )
    console.print(table)
    for report in result.sources.values():
        for uri, reason in report.bad_files.items():
            console.print(f"[yellow]quarantined file[/] {uri}: {reason}")
    console.print(f"clean data: {result.output_uri}")


def print_rows(title: str, rows: dict[str, object]) -> None:
    """A two-column key/value table: one per stage."""
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in rows.items():
        table.add_row(key, value if isinstance(value, str) else f"{value}")
    console.print(table)


def print_features(features) -> None:
    rows = {}
    for name, count in features.rows.items():
        classes = features.class_counts.get(name) or {}
        detail = ", ".join(f"{k}: {v:,}" for k, v in list(classes.items())[:6])
        rows[f"{name} rows"] = f"{count:,}" + (f" ({detail})" if detail else "")
    split = features.split
    how = f"{split.get('by', 'random')}" + (" (stratified)" if split.get("stratified") else "")
    print_rows("features", {"split": how, **rows, "feature spec": features.spec_uri})


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def evaluation_rows(evaluation) -> dict[str, str]:
    metrics = evaluation.metrics
    rows = {name: _number(metrics.get(name)) for name in HEADLINE[evaluation.task]}
    if evaluation.task == "binary":
        base_rate = metrics["positives"] / max(metrics["rows"], 1)
        rows["pr_auc"] += f" (base rate {base_rate:.4f})"
        calibration = metrics.get("calibration", {})
        rows["calibration"] = (
            f"{calibration.get('method')}: Brier {_number(calibration.get('brier_before'))} -> "
            f"{_number(calibration.get('brier_after'))}"
        )
        rows["threshold"] = f"{evaluation.threshold:.4f} ({evaluation.threshold_rule})"
    rows["split"] = str(metrics.get("split", {}).get("by", "random"))
    rows["report"] = evaluation.report_uri
    return rows


def print_evaluation(evaluation) -> None:
    print_rows(f"evaluate ({evaluation.task}, test split)", evaluation_rows(evaluation))


def print_training(trained, evaluation, result) -> None:
    """Train, evaluate and register tables, then where everything went."""
    print_rows(
        "train",
        {
            "plan": f"{trained.plan}: {trained.plan_reason}",
            "rounds (best)": f"{trained.rounds} ({trained.best_iteration + 1})",
            f"valid {trained.valid_metric}": f"{trained.valid_aucpr:.4f}",
            "class imbalance": ", ".join(
                f"{k}={v}" for k, v in trained.imbalance.items() if k != "class_counts"
            ),
            "resumed from round": str(trained.resumed_from_round),
            **(
                {
                    "interruptions": (
                        f"{trained.interruptions['interruptions']} (rounds redone "
                        f"{trained.interruptions['rounds_redone']}, just-in-time checkpoints "
                        f"{trained.interruptions['just_in_time_checkpoints']})"
                    )
                }
                if "interruptions" in trained.interruptions
                else {}
            ),
            "seconds": f"{trained.seconds:.1f}",
            "model": trained.model_uri,
        },
    )
    print_evaluation(evaluation)
    print_rows(
        "register",
        {
            "version": str(result.version),
            "production": "promoted" if result.promoted else "unchanged",
            "gate": result.gate["reason"],
            "stage seconds": ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()),
            "run": result.run_uri,
        },
    )


def _dollars(value) -> str:
    return "-" if value is None else f"${value:,.4f}"


def print_cost(cost: dict) -> None:
    """Node-hours by node type and market, dollars against on-demand, interruptions."""
    if "error" in cost:
        console.print(f"[yellow]run cost not computed[/]: {cost['error']}")
        return
    table = Table(title="cost (cluster/prices.yaml, approximate)", title_justify="left")
    for column in ("node type", "instance", "market", "nodes", "node-hours", "$", "on-demand $"):
        table.add_column(column, justify="left" if column in ("node type", "instance") else "right")
    for row in cost["by_type"]:
        table.add_row(
            row["node_type"],
            row["instance"] or "-",
            row["market"],
            str(row["nodes"]),
            f"{row['node_hours']:.4f}",
            _dollars(row["dollars"]),
            _dollars(row["on_demand_dollars"]),
        )
    console.print(table)
    interruptions = ", ".join(f"{k} {v}" for k, v in cost["interruptions"].items()) or "none"
    line = (
        f"run cost {_dollars(cost['dollars'])} (on-demand {_dollars(cost['on_demand_dollars'])}, "
        f"saving {cost['saving']:.0%}); interruptions: {interruptions}"
    )
    if cost["unpriced_node_hours"]:
        line += (
            f"; {cost['unpriced_node_hours']:.4f} node-hours not priced: nodes without an "
            "instance type (a local Ray, or no rayline.io/instance-type label)"
        )
    console.print(line)
    advice = cost.get("rightsizing")
    if advice is not None:
        for item in advice["recommendations"]:
            console.print(
                f"rightsizing {item['node_type']}: {item['why']} "
                f"(saves ${item['dollars_per_hour_saved']:.3f}/h)"
            )
        if advice["reason"]:
            console.print(f"rightsizing: {advice['reason']}")
