"""Every entry point answers bad input with exit code 2 and one `error:` line, never a traceback.

The entry points are the installed console script (`.venv/bin/rayline <stage> ...`) and each
module's `__main__` (`python -m jobs.<stage>`, `python -m serving.app|demo`), run as real
subprocesses. The bad inputs are the ones a user makes: a config file that is not there, a
typo'd key, a source or input URI that does not exist, a run that does not exist, a model
version that was never published. The subprocesses run concurrently (most of their time is
importing Ray and xgboost, or starting a local Ray), PARALLEL at a time.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_job_submit import cluster, wait_for_dashboard  # noqa: F401 - a fixture

VENV_BIN = Path(sys.executable).parent
RAYLINE = VENV_BIN / "rayline"
CASE_TIMEOUT_S = 240
PARALLEL = 3


@dataclass(frozen=True)
class Entry:
    """One way to start a stage: a module's `__main__` and, if it has one, its subcommand."""

    name: str
    module: str
    command: tuple[str, ...] | None  # `rayline` subcommand words; None: no console script
    args: tuple[str, ...] = ()  # the options a stage needs besides --config


# Placeholders in args, filled in by the `paths` fixture.
RUN, INPUT, OUTPUT, DATA = "{run}", "{input}", "{output}", "{data}"
STAGES = [
    Entry("ingest", "jobs.ingest", ("ingest",)),
    Entry("features", "jobs.features", ("features",), ("--run", RUN)),
    Entry("train", "jobs.train", ("train",), ("--run", RUN)),
    Entry("cv", "jobs.cv", ("cv",), ("--run", RUN)),
    Entry("tune", "jobs.tune", ("tune",), ("--run", RUN)),
    Entry("evaluate", "jobs.evaluate", ("evaluate",), ("--run", RUN)),
    Entry("predict", "jobs.predict", ("predict",), ("--input", INPUT, "--output", OUTPUT)),
    Entry("pipeline", "jobs.pipeline", ("pipeline",)),
    Entry("models", "jobs.registry list", ("models", "list")),
    Entry("serving.app", "serving.app", None),
    Entry("serving.demo", "serving.demo", None, ("--data", DATA)),
]
BY_NAME = {entry.name: entry for entry in STAGES}


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # with placeholders and a {config} placeholder
    expect: str  # a placeholder-bearing fragment the error line must contain
    config: str  # which config: missing, typo, good


def _forms(entry: Entry, tail: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """The `python -m` form and, where there is one, the console-script form."""
    module, *words = entry.module.split()
    forms = [("module", ("{python}", "-m", module, *words, *tail))]
    if entry.command:
        forms.append(("rayline", ("{rayline}", *entry.command, *tail)))
    return forms


def _cases() -> list[Case]:
    cases = []
    for entry in STAGES:
        for config, expect in (("missing", "{config}"), ("typo", "train.num_workerz")):
            tail = ("--config", "{config}", *entry.args)
            for form, argv in _forms(entry, tail):
                cases.append(Case(f"{entry.name}-{config}-config-{form}", argv, expect, config))
    for name in ("ingest", "pipeline"):  # a source URI that does not exist
        tail = ("--config", "{config}", *BY_NAME[name].args)
        for form, argv in _forms(BY_NAME[name], tail):
            cases.append(Case(f"{name}-missing-source-{form}", argv, "{source}", "good"))
    predict = BY_NAME["predict"]
    for form, argv in _forms(predict, ("--config", "{config}", *predict.args)):
        cases.append(Case(f"predict-missing-input-{form}", argv, "{input}", "good"))
    for name in ("features", "train", "cv", "tune", "evaluate"):  # a run that does not exist
        tail = ("--config", "{config}", *BY_NAME[name].args)
        for form, argv in _forms(BY_NAME[name], tail):
            cases.append(Case(f"{name}-missing-run-{form}", argv, "{run}", "good"))
    models = Entry("models", "jobs.registry", ("models",))
    for verb in ("promote", "show"):  # a version that was never published
        tail = (verb, "--config", "{config}", "999")
        for form, argv in _forms(models, tail):
            cases.append(Case(f"models-{verb}-missing-version-{form}", argv, "999", "good"))
    tail = ("--config", "{config}", "--input", "{sample}", "--output", OUTPUT, "--ref", "999")
    for form, argv in _forms(predict, tail):
        cases.append(Case(f"predict-missing-version-{form}", argv, "999", "good"))
    cases.append(
        Case(
            "serving.app-missing-alias-module",
            ("{python}", "-m", "serving.app", "--config", "{config}"),
            "'production'",
            "good",
        )
    )
    return cases


CASES = _cases()
# A quick sample of every kind of bad input and both forms runs in the fast suite; the whole
# matrix (about 60 subprocesses, several of which start a local Ray first) is marked slow.
FAST = {
    "pipeline-missing-config-rayline",
    "train-typo-config-module",
    "serving.demo-typo-config-module",
    "evaluate-missing-run-rayline",
    "models-promote-missing-version-rayline",
    "models-show-missing-version-module",
}


def _marks(case: Case) -> list:
    return [] if case.id in FAST else [pytest.mark.slow]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """Configs (good, typo'd, missing) over an empty storage; URIs that do not exist."""
    root = tmp_path_factory.mktemp("entrypoints")
    storage, nothing = root / "storage", root / "no-such-data"
    sample = root / "sample" / "transactions"
    sample.mkdir(parents=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"txn_id": ["t1"], "amount": [1.0]}), sample / "part.parquet")
    data = yaml.safe_load((ROOT / "configs" / "fraud.yaml").read_text())
    data["storage"] = str(storage)
    for name, source in data["sources"].items():
        source["uri"] = str(nothing / name)
    good = root / "good.yaml"
    good.write_text(yaml.safe_dump(data, sort_keys=False))
    data["train"]["num_workerz"] = data["train"].pop("num_workers")
    typo = root / "typo.yaml"
    typo.write_text(yaml.safe_dump(data, sort_keys=False))
    return {
        "python": sys.executable,
        "rayline": str(RAYLINE),
        "good": str(good),
        "typo": str(typo),
        "missing": str(root / "missing.yaml"),
        "run": str(storage / "runs" / "20260101T000000-nosuchrun"),
        "input": str(root / "no-such-input"),
        "output": str(root / "predictions"),
        "data": str(root / "demo-data"),
        "source": str(nothing / "transactions"),
        "sample": str(sample),
    }


def _fill(text: str, paths: dict[str, str], config: str) -> str:
    return text.format(**paths, config=paths[config])


def _run(case: Case, paths: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    argv = [_fill(part, paths, case.config) for part in case.argv]
    try:
        return subprocess.run(
            argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=CASE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as expired:
        return subprocess.CompletedProcess(argv, -1, str(expired.stdout), str(expired.stderr))


def _case_id(item) -> str | None:
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get("case") if callspec is not None else None
    return case.id if isinstance(case, Case) else None


@pytest.fixture(scope="module")
def outcomes(request, paths) -> dict[str, subprocess.CompletedProcess]:
    """Runs every selected case of this module at once, PARALLEL subprocesses at a time."""
    assert RAYLINE.exists(), f"the console script is not installed at {RAYLINE}"
    selected = {_case_id(item) for item in request.session.items if item.module is request.module}
    cases = [case for case in CASES if case.id in selected]
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = pool.map(lambda case: _run(case, paths), cases)
        return {case.id: result for case, result in zip(cases, results, strict=True)}


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "case", [pytest.param(case, id=case.id, marks=_marks(case)) for case in CASES]
)
def test_bad_input_exits_2_with_one_line(case: Case, outcomes, paths):
    result = outcomes[case.id]
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr is not one line:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert _fill(case.expect, paths, case.config) in lines[0], lines[0]
    assert result.returncode == 2, output


def test_every_module_with_a_main_is_covered():
    """A stage module that gains a `__main__` must be added to STAGES."""
    with_main = {
        f"{folder}.{path.stem}"
        for folder in ("jobs", "serving")
        for path in (ROOT / folder).glob("*.py")
        if 'if __name__ == "__main__":' in path.read_text()
    }
    # The spot watcher takes no pipeline config: tests/test_spot_watcher.py checks that its bad
    # arguments get one line and exit code 2; tests/test_stream_cli.py and tests/test_replay.py
    # do the same for `python -m jobs.stream` and `python -m jobs.replay`.
    covered = {entry.module.split()[0] for entry in STAGES}
    covered |= {"jobs.cli", "jobs.spot_watcher", "jobs.stream", "jobs.replay"}
    assert with_main <= covered, sorted(with_main - covered)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_submit_driver_reports_bad_input_in_one_line(cluster, paths):  # noqa: F811
    """`ray job submit -- python -m jobs.pipeline` with a source that does not exist: the
    driver joins the cluster, fails, and its log holds the one error line, no traceback."""
    wait_for_dashboard(cluster)
    ray = str(VENV_BIN / "ray")
    job_id = f"rayline-bad-input-{secrets.token_hex(4)}"
    excludes = ["data/", "artifacts/", ".venv/", "*.parquet"]
    submit = [
        ray, "job", "submit", "--address", cluster.dashboard, "--submission-id", job_id,
        "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": excludes}),
        "--", "python", "-m", "jobs.pipeline", "--config", paths["good"],
    ]  # fmt: skip
    submitted = subprocess.run(submit, env=cluster.env, capture_output=True, text=True,
                               timeout=480, cwd=ROOT)  # fmt: skip
    assert submitted.returncode != 0, submitted.stdout + submitted.stderr

    def job(verb: str) -> str:
        command = [ray, "job", verb, "--address", cluster.dashboard, job_id]
        done = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=60)
        return done.stdout + done.stderr

    assert "failed with exit code 2" in job("status")
    logs = job("logs")
    assert "Traceback" not in logs + submitted.stdout + submitted.stderr, logs
    errors = [line for line in logs.splitlines() if line.startswith("error:")]
    assert errors == [f"error: source 'transactions': no such URI {paths['source']}"], logs
