"""The `rayline` command: one subcommand per batch stage, plus `rayline serve status` (the app
itself runs with `python -m serving.app`, since jobs never imports serving)."""

from __future__ import annotations

from typing import Annotated

import typer

from jobs import (
    cluster,
    cost,
    cv,
    evaluate,
    features,
    ingest,
    pipeline,
    predict,
    registry,
    serve_status,
    spot_watcher,
    stream,
    train,
    tune,
)
from jobs.entrypoint import run_cli

app = typer.Typer(help="rayline: raw data to a served XGBoost model, on Ray.", no_args_is_help=True)
data_app = typer.Typer(help="Sample data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(registry.app, name="models")
app.add_typer(serve_status.app, name="serve")
app.add_typer(cluster.app, name="cluster")
app.add_typer(cost.app, name="cost")
app.add_typer(stream.app, name="stream")
app.command("ingest")(ingest.main)
app.command("features")(features.main)
app.command("train")(train.main)
app.command("cv")(cv.main)
app.command("tune")(tune.main)
app.command("evaluate")(evaluate.main)
app.command("predict")(predict.main)
app.command("pipeline")(pipeline.main)
app.command("spot-watcher")(spot_watcher.main)


@data_app.command("generate")
def generate_command(
    out: Annotated[
        str, typer.Option(help="Folder or s3:// URI to write the three sources under")
    ] = "data/fraud",
    rows: Annotated[int, typer.Option(help="Number of transactions")] = 100_000,
    days: Annotated[int, typer.Option(help="Days of transactions (one parquet file each)")] = 30,
    seed: Annotated[int, typer.Option(help="Random seed")] = 7,
) -> None:
    """Generate the sample data: transactions parquet, customers CSV, merchants JSONL."""
    from jobs.data import generate

    made = generate(out, rows=rows, days=days, seed=seed)
    typer.echo(
        f"wrote {made.transactions:,} transactions ({made.fraud_rate:.2%} fraud), "
        f"{made.customers:,} customers, {made.merchants:,} merchants to {out}"
    )


@data_app.command("table")
def table_command(
    kind: Annotated[
        str,
        typer.Argument(
            help="survey (CSV, binary), segments (parquet, "
            "multiclass) or houses (JSONL, regression)"
        ),
    ],
    out: Annotated[str, typer.Option(help="Folder to write the table under")],
    rows: Annotated[int, typer.Option(help="Number of rows")] = 3000,
    seed: Annotated[int, typer.Option(help="Random seed")] = 5,
) -> None:
    """Generate a sample table of another shape, for configs/survey|segments|houses.yaml."""
    from jobs.errors import SourceError
    from jobs.sample_tables import generate_table

    if kind not in ("survey", "segments", "houses"):
        raise SourceError(f"unknown sample table {kind!r}: survey, segments or houses")
    made = generate_table(kind, out, rows=rows, seed=seed)
    typer.echo(f"wrote {made['rows']:,} rows to {made['file']}")


def main() -> None:
    """The `rayline` console script: bad input exits 2 with one line, never a traceback."""
    run_cli(app)


if __name__ == "__main__":
    main()
