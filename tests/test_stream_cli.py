"""`rayline stream bootstrap | replay | run` as a user types them, and their bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from jobs.stream_keys import StreamKeys
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def rayline(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def config_file(config, tmp_path, **stream) -> str:
    data = config.model_dump(mode="json", exclude_none=True)
    data["stream"] = {**(data.get("stream") or {}), **stream}
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_bootstrap_replay_run_from_the_command_line(pipeline_run, redis_server, tmp_path):
    config, result = pipeline_run
    path = config_file(config, tmp_path, redis_url=redis_server.url, partitions=2, max_workers=1)
    loaded = rayline("stream", "bootstrap", "--config", path, "--exclude-split", "test")
    assert loaded.returncode == 0, loaded.stderr
    assert "online state:" in loaded.stdout and result.run_uri in loaded.stdout
    sent = rayline(
        "stream", "replay", "--config", path, "--split", "test", "--run", result.run_uri,
        "--limit", "150", "--labels",
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    ran = rayline("stream", "run", "--config", path, "--until-idle", "2")
    assert ran.returncode == 0, ran.stderr
    assert "scored=150" in ran.stdout and "dead=0" in ran.stdout, ran.stdout
    client, keys = redis_server.client(), StreamKeys.of(config)
    assert client.xlen(keys.scores) == 150
    assert client.llen(keys.feedback) == 150  # every label joined during the run
    assert "Traceback" not in ran.stdout + ran.stderr
    again = rayline("stream", "bootstrap", "--config", path)  # would roll the stream back
    assert again.returncode == 2 and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["run"], "cannot reach redis://127.0.0.1:{port}/0"),
        (["bootstrap"], "cannot reach redis://127.0.0.1:{port}/0"),
        (["replay", "--rate", "-5"], "rate"),
    ],
)
def test_bad_input_is_one_line(pipeline_run, tmp_path, command, expected):
    config, _ = pipeline_run
    port = free_port()  # nothing listens there
    path = config_file(config, tmp_path, redis_url=f"redis://127.0.0.1:{port}/0")
    done = rayline("stream", *command, "--config", path, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert expected.format(port=port) in lines[0]


@pytest.mark.parametrize("module", ["jobs.cli stream", "jobs.stream"])
def test_a_config_without_a_stream_section_is_one_line(module):
    houses = str(ROOT / "configs" / "houses.yaml")
    done = subprocess.run(
        [sys.executable, "-m", *module.split(), "run", "--config", houses],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip().startswith("error: ")
    assert "no `stream:` section" in done.stderr and len(done.stderr.strip().splitlines()) == 1
