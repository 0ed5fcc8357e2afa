"""Serving without a server: the Serve config file, the serve: section's checks, and token auth
(parsing, scopes, constant-time comparison, secret-file permissions, errors that never show a
token)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from jobs.config import load_config
from jobs.errors import ConfigError
from jobs.serve_config import AuthConfig, ServeConfig
from serving import app as serving_app
from serving.auth import Authenticator, AuthFailure, parse_entries
from tests.conftest import ROOT

SECRET = "s3cret-token-value"


def test_serve_config_file_is_valid_and_matches_the_pipeline_config():
    raw = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    [application] = schema.applications
    module, _, attribute = application.import_path.partition(":")
    assert (module, getattr(serving_app, attribute)) == ("serving.app", serving_app.app_builder)
    pipeline = load_config(ROOT / application.args["config"])
    assert schema.http_options.port == pipeline.serve.port
    assert schema.http_options.host == pipeline.serve.host
    assert schema.logging_config.encoding == "JSON"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
        ({"host": "0.0.0.0", "auth": {"local_demo_no_auth": True}}, "loopback"),
        ({"models": [{"name": "a"}, {"name": "a"}]}, "listed twice"),
        ({"models": []}, "models"),
        ({"models": [{"name": "a", "canary": {"ref": "2", "weight": 2}}]}, "weight"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"auth": {"token": "x"}}, "token"),
    ],
)
def test_serve_section_refuses_incoherent_settings(change, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig.model_validate(change)


def test_models_default_to_the_config_name():
    config = load_config(ROOT / "configs" / "survey.yaml")
    assert [m.name for m in config.serve.models] == ["survey"]


@pytest.mark.parametrize(
    "entries, message",
    [
        (f"{SECRET}", "not 'scopes:token'"),
        (f"read:{SECRET}", "unknown scope"),
        ("predict:tiny1", "shorter than"),
        (f"predict:{SECRET} :{SECRET}", "entry 2"),
    ],
)
def test_bad_token_entries_name_the_entry_never_the_token(entries, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_entries(entries, "env X")
    assert SECRET not in str(error.value) and "tiny1" not in str(error.value)


def test_scopes_401_and_403():
    auth = Authenticator(parse_entries(f"predict:{SECRET} admin:admin-{SECRET}", "env"))
    auth.check(f"Bearer {SECRET}", "predict")
    auth.check(f"bearer admin-{SECRET}", "admin")
    for header, status in [
        (None, 401),
        ("", 401),
        (SECRET, 401),
        (f"Basic {SECRET}", 401),
        ("Bearer ", 401),
        (f"Bearer {SECRET}x", 401),
        (f"Bearer {SECRET}", 403),  # a predict token on an admin route
    ]:
        with pytest.raises(AuthFailure) as failure:
            auth.check(header, "admin")
        assert failure.value.status == status, header
        assert SECRET not in failure.value.message


def test_tokens_from_a_private_secret_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYLINE_SERVE_TOKENS", raising=False)
    secret = tmp_path / "tokens"
    secret.write_text(f"# serving tokens\npredict:{SECRET}\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Authenticator.from_config(AuthConfig(tokens_file=str(secret)))
    secret.chmod(0o600)
    Authenticator.from_config(AuthConfig(tokens_file=str(secret))).check(
        f"Bearer {SECRET}", "predict"
    )
    with pytest.raises(ConfigError, match="RAYLINE_SERVE_TOKENS"):
        Authenticator.from_config(AuthConfig())
    assert not Authenticator.from_config(AuthConfig(local_demo_no_auth=True)).enabled


def test_serving_without_tokens_is_one_line_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAYLINE_SERVE_TOKENS"}
    done = subprocess.run(
        [sys.executable, "-m", "serving.app", "--config", "configs/fraud.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "RAYLINE_SERVE_TOKENS" in done.stderr


@pytest.mark.parametrize(
    "address, message",
    [("127.0.0.1:1", "no Ray cluster answers"), ("not a host", "not host:port")],
)
def test_serve_status_without_a_cluster_is_one_line(address, message):
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "serve", "status", "--config", "configs/fraud.yaml",
         "--address", address],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and message in done.stderr
    assert done.stderr.strip().count("\n") == 0


def test_serve_run_refuses_the_no_auth_switch(tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "fraud.yaml").read_text())
    config["serve"]["auth"]["local_demo_no_auth"] = True
    path = tmp_path / "fraud.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="not `serve run`"):
        serving_app.app_builder({"config": str(path)})


@pytest.mark.slow
def test_make_serve_stops_cleanly_on_ctrl_c(pipeline_run, tmp_path):
    """`python -m serving.app` (what `make serve` runs) serves, then Ctrl-C ends it and its
    embedded Ray within seconds, leaving no process of its session behind."""
    import signal
    import time

    import requests

    from tests.conftest import PREDICT_HEADERS, free_port

    config, _ = pipeline_run
    path = tmp_path / "fraud.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.app", "--config", str(path), "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        while line and "serving on" not in line:
            line = process.stdout.readline()
        assert "serving on" in line
        url = f"http://127.0.0.1:{port}/models"
        answer = requests.get(url, headers=PREDICT_HEADERS, timeout=30)
        assert answer.status_code == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _session_processes(process.pid):
            time.sleep(0.5)
        assert not _session_processes(process.pid)
    finally:
        for pid in [process.pid, *_session_processes(process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _session_processes(session_id: int) -> list[int]:
    """Live processes of a session (`start_new_session`), zombies excluded."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == session_id and fields[0] != "Z":
                    found.append(int(entry.name))
    return found
