"""The `rayline` command line: subcommands exist and `data generate` writes the three sources."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from tests.conftest import ROOT

RAYLINE = [sys.executable, "-m", "jobs.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RAYLINE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_every_stage_has_a_subcommand():
    help_text = run("--help").stdout
    for command in (
        "data",
        "ingest",
        "features",
        "train",
        "cv",
        "tune",
        "evaluate",
        "predict",
        "pipeline",
        "models",
    ):
        assert command in help_text


def test_data_generate_writes_three_formats(tmp_path: Path):
    out = tmp_path / "data"
    result = run("data", "generate", "--out", str(out), "--rows", "3000", "--days", "3")
    assert result.returncode == 0, result.stderr
    days = sorted(p.parent.name for p in (out / "transactions").rglob("*.parquet"))
    assert days == ["day=2026-01-01", "day=2026-01-02", "day=2026-01-03"]
    rows = sum(pq.read_metadata(p).num_rows for p in (out / "transactions").rglob("*.parquet"))
    assert rows >= 3000  # plus the duplicated rows planted as dirty data
    header = (out / "customers" / "customers.csv").read_text().splitlines()[0]
    assert header == '"customer_id","signup_date","country","birth_year","email"'
    first = (out / "merchants" / "merchants.jsonl").read_text().splitlines()[0]
    assert set(json.loads(first)) == {"id", "category", "country"}


def test_a_config_typo_exits_non_zero_naming_the_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ROOT / "configs" / "fraud.yaml").read_text().replace("num_boost_round", "num_boost_rounds")
    )
    result = run("pipeline", "--config", str(bad))
    assert result.returncode != 0
    assert "train.num_boost_rounds" in result.stderr + result.stdout
