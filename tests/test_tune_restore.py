"""Tune state is restored only when it matches the HMAC written when the driver stopped.

The slow tests share one real interrupted search (a `python -m jobs.tune` process stopped with
SIGINT): the tampering test works on a copy, then the last test resumes the original.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from ray import cloudpickle

from jobs.config import S3Config
from jobs.signing import SigningKeyError, sign_tree, signing_key, verify_tree
from jobs.storage import Storage
from jobs.tune import _progress, _progress_callback, tune_model
from tests.conftest import ROOT, make_config

SETTINGS = {
    "tune.num_samples": 16,
    "tune.num_boost_round": 30,
    "tune.grace_period": 5,
    "tune.max_concurrent": 1,
}


@pytest.fixture(scope="module", autouse=True)
def signing_key_file(tmp_path_factory):
    """A key file of this module's own (subprocesses inherit it), never ~/.config/rayline."""
    path = tmp_path_factory.mktemp("key") / "signing_key"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAYLINE_SIGNING_KEY", raising=False)
        patch.setenv("RAYLINE_SIGNING_KEY_FILE", str(path))
        yield path


def _tree(root: Path) -> Path:
    for relative, content in {
        "tuner.pkl": b"\x80\x04N.",
        ".validate_storage_marker": b"",
        "_trial_0/params.pkl": b"\x80\x04}.",
        "_trial_0/result.json": b'{"done": true}\n',
    }.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)
    return root


def test_signature_names_changed_added_and_removed_files(tmp_path):
    state, signature = _tree(tmp_path / "experiment"), str(tmp_path / "experiment.sig.json")
    storage = Storage()
    assert "no signature" in verify_tree(storage, str(state), signature)
    sign_tree(storage, str(state), signature)
    assert verify_tree(storage, str(state), signature) is None
    with open(state / "_trial_0" / "params.pkl", "ab") as handle:  # hidden and _ files count
        handle.write(b"x")
    (state / "searcher-state.pkl").write_bytes(b"\x80\x04N.")
    (state / ".validate_storage_marker").unlink()
    assert verify_tree(storage, str(state), signature) == (
        "changed: _trial_0/params.pkl; added: searcher-state.pkl; removed: .validate_storage_marker"
    )


def test_a_signature_rewritten_without_the_key_is_rejected(tmp_path, monkeypatch):
    import hashlib
    import json

    state, signature = _tree(tmp_path / "experiment"), tmp_path / "experiment.sig.json"
    sign_tree(Storage(), str(state), str(signature))
    (state / "tuner.pkl").write_bytes(b"evil")  # and the listing updated to match
    forged = json.loads(signature.read_text())
    forged["files"]["tuner.pkl"] = hashlib.sha256(b"evil").hexdigest()
    signature.write_text(json.dumps(forged))
    assert "not valid for this signing key" in verify_tree(Storage(), str(state), str(signature))
    monkeypatch.setenv("RAYLINE_SIGNING_KEY", "another machine's key")
    sign_tree(Storage(), str(state), str(signature))
    monkeypatch.setenv("RAYLINE_SIGNING_KEY", "this machine's key")
    assert "not valid for this signing key" in verify_tree(Storage(), str(state), str(signature))


def test_key_file_is_created_private_once_and_must_stay_private(tmp_path, monkeypatch):
    path = tmp_path / "config" / "rayline" / "signing_key"
    monkeypatch.setenv("RAYLINE_SIGNING_KEY_FILE", str(path))
    key = signing_key()
    assert len(key) == 64 and path.stat().st_mode & 0o777 == 0o600
    assert signing_key() == key
    path.chmod(0o644)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        signing_key()


def test_signing_reads_s3_through_storage(s3_bucket):
    endpoint, bucket = s3_bucket
    storage = Storage(S3Config(endpoint_url=endpoint))
    state = f"s3://{bucket}/run/tune/experiment"
    for relative in ("tuner.pkl", "_trial_0/params.pkl"):
        storage.write_bytes(f"{state}/{relative}", b"\x80\x04N.")
    signature = f"s3://{bucket}/run/tune/experiment.sig.json"
    sign_tree(storage, state, signature)
    assert verify_tree(storage, state, signature) is None
    storage.write_bytes(f"{state}/tuner.pkl", b"\x80\x04N.tampered")
    assert verify_tree(storage, state, signature) == "changed: tuner.pkl"


def test_progress_counts_finished_running_and_stopped_early():
    def trial(status, rounds=None):
        return SimpleNamespace(status=status, last_result={"rounds": rounds} if rounds else {})

    shown, lock = {}, threading.RLock()  # the real bar holds locks: they must not be pickled
    _progress["update"] = lambda **fields: lock and shown.update(fields)
    try:
        callback = cloudpickle.loads(cloudpickle.dumps(_progress_callback(30)))  # as tuner.pkl
        trials = [trial("TERMINATED", 30), trial("TERMINATED", 10), trial("RUNNING", 5)]
        callback.on_step_end(1, [*trials, trial("PENDING"), trial("ERROR")])
    finally:
        _progress["update"] = None
    assert shown == {"completed": 3, "status": "1 running, 1 stopped early, 1 failed"}


class _Plant:
    """A pickle that creates a file when it is loaded (what an attacker would do, harmlessly)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.fixture(scope="module")
def interrupted(pipeline_run, tmp_path_factory):
    """A search stopped by SIGINT after at least one trial finished: (config, run, finished)."""
    config, result = pipeline_run
    folder = tmp_path_factory.mktemp("interrupted")
    tuning = make_config("d", config.storage, **SETTINGS)
    config_path = folder / "tune.yaml"
    config_path.write_text(yaml.safe_dump(tuning.model_dump(mode="json")))
    run = folder / "run"
    run.mkdir()
    os.symlink(Path(result.run_uri) / "features", run / "features")
    experiment = run / "tune" / "experiment"

    def finished() -> set[str]:
        return {
            path.parent.name
            for path in experiment.glob("*/result.json")
            if '"done": true' in path.read_text()
        }

    with open(folder / "stderr.txt", "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "jobs.tune", "--config", str(config_path), "--run", str(run)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0.5"},  # results reach storage soon
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None and not finished():
            time.sleep(0.2)
        finished_before = finished()
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=120)
    log = (folder / "stderr.txt").read_text()
    assert returncode == 130, log[-3000:]
    assert "tune interrupted with" in log and "tune: trials" in log
    assert finished_before, "no trial finished before the interruption"
    return SimpleNamespace(
        config=tuning, config_path=config_path, run=run, finished=finished_before
    )


def _copy(interrupted, tmp_path) -> Path:
    """The interrupted run, copied (signatures name relative paths, so the copy verifies)."""
    run = tmp_path / "run"
    shutil.copytree(interrupted.run, run, symlinks=True)
    return run


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tampered_state_is_refused_without_unpickling_and_fresh_starts_over(interrupted, tmp_path):
    run = _copy(interrupted, tmp_path)
    state = run / "tune" / "experiment"
    planted = tmp_path / "code-ran"
    (state / "tuner.pkl").write_bytes(pickle.dumps(_Plant(planted)))
    command = [sys.executable, "-m", "jobs.cli", "tune", "--config"]
    refused = subprocess.run(
        [*command, str(interrupted.config_path), "--run", str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert lines[0].startswith(f"error: refusing to restore the Tune experiment {state}: ")
    assert "changed: tuner.pkl" in lines[0] and "--fresh" in lines[0]
    assert not planted.exists()

    fresh = make_config("d", interrupted.config.storage, **{**SETTINGS, "tune.num_samples": 2})
    result = tune_model(fresh, str(run), restore=False)  # what `rayline tune --fresh` calls
    assert result.trials == 2 and not planted.exists()
    assert len([path for path in state.iterdir() if path.is_dir()]) == 2  # old trials deleted
    assert verify_tree(Storage(), str(state), str(run / "tune" / "experiment.sig.json")) is None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_interrupted_tune_is_signed_and_resumes_without_rerunning_finished_trials(interrupted):
    run = interrupted.run  # in place: Ray puts new trials of a moved experiment at the old path
    state, signature = run / "tune" / "experiment", run / "tune" / "experiment.sig.json"
    assert verify_tree(Storage(), str(state), str(signature)) is None
    resumed = tune_model(interrupted.config, str(run), restore=True)
    assert resumed.trials == SETTINGS["tune.num_samples"]
    trial_dirs = {path.name for path in state.iterdir() if path.is_dir()}
    assert interrupted.finished <= trial_dirs
    assert len(trial_dirs) == SETTINGS["tune.num_samples"]
    assert verify_tree(Storage(), str(state), str(signature)) is None  # signed again
