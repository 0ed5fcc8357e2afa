"""Retraining on live evidence: when labelled traffic shows the model has got worse (PR-AUC)
or its scores have drifted (PSI), `ray job submit` runs the pipeline again, at most once per
cooldown; the pipeline's promotion gate decides whether the new model serves."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import redis

from jobs.stream_keys import StreamKeys

SUBMIT_TIMEOUT_S = 120
FAILURE_BACKOFF_S = 60.0  # a failed submission is retried after this (or the cooldown if less)
EXCLUDES = ["data/", "artifacts/", ".venv/", "*.parquet", ".git/"]  # not uploaded by submit


def text(value) -> str:  # Redis replies as text, whether or not the client decodes them
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def retrain_reasons(config, quality: dict, psi: float | None) -> list[str]:
    """Why retraining is due: live PR-AUC below `min_pr_auc` over at least `min_labels`
    labels, or score PSI above `max_score_psi`; empty when neither holds."""
    feedback, pr_auc, n = config.stream.feedback, quality.get("pr_auc"), quality.get("n", 0)
    reasons = []
    low = feedback.min_pr_auc is not None and pr_auc is not None and n >= feedback.min_labels
    if low and pr_auc < feedback.min_pr_auc:
        reasons.append(f"live PR-AUC {pr_auc:.3f} < {feedback.min_pr_auc} over {n} labels")
    limit = feedback.max_score_psi
    if limit is not None and psi is not None and math.isfinite(psi) and psi > limit:
        reasons.append(f"score PSI {psi:.3f} > {limit}")
    return reasons


def maybe_retrain(
    config,
    quality: dict,
    psi: float | None,
    client: redis.Redis,
    root: str,
    config_path: str,
    now: float | None = None,
    env: dict | None = None,
) -> dict | None:
    """Submits the retraining pipeline with `ray job submit` when quality dropped or scores
    drifted and the cooldown since the last submission has passed. Returns what was recorded
    in `keys.retrain` (a failure has `error`), or None when nothing was due."""
    from jobs.summary import console

    feedback, keys = config.stream.feedback, StreamKeys.of(config)
    reasons = retrain_reasons(config, quality, psi)
    if not reasons:
        return None
    now = time.time() if now is None else now
    last = {text(k): text(v) for k, v in client.hgetall(keys.retrain).items()}
    if now - float(last.get("at") or "-inf") < feedback.cooldown_s:
        return None
    backoff = min(FAILURE_BACKOFF_S, feedback.cooldown_s)
    if now - float(last.get("failed_at") or "-inf") < backoff:
        return None
    reason = "; ".join(reasons)
    env = dict(os.environ if env is None else env)
    address = feedback.retrain_address or env.get("RAY_ADDRESS")
    tokens = [
        t.replace("{config}", str(config_path)).replace("{root}", str(root))
        for t in shlex.split(feedback.retrain_command)
    ]
    ray = Path(sys.executable).with_name("ray")
    argv = [
        str(ray) if ray.exists() else "ray", "job", "submit", "--address", str(address),
        "--working-dir", str(root), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
        "--no-wait", "--", *tokens,
    ]  # fmt: skip
    error, output = None, ""
    if not address:
        error = "no feedback.retrain_address and RAY_ADDRESS is not set"
    else:
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S, env=env, cwd=root
            )
            output = done.stdout + done.stderr
            found = re.search(r"raysubmit_\w+", output)
            if done.returncode != 0 or not found:
                lines = [line for line in output.strip().splitlines() if line.strip()]
                error = f"exit {done.returncode}: {lines[-1] if lines else 'no output'}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            error = f"{type(exc).__name__}: {exc}"
    if error:
        client.hset(keys.retrain, mapping={"failed_at": now, "last_error": error})
        console.print(f"[red]retraining not submitted[/red] ({reason}): {error}", soft_wrap=True)
        return {"at": now, "reason": reason, "error": error}
    record = {
        "at": now, "job_id": found.group(0), "reason": reason, "address": address,
        "command": shlex.join(tokens),
    }  # fmt: skip
    tx = client.pipeline(transaction=True)
    tx.hset(keys.retrain, mapping=record)
    tx.hdel(keys.retrain, "failed_at", "last_error")
    tx.hincrby(keys.retrain, "submissions", 1)
    tx.execute()
    console.print(
        f"[bold yellow]retraining submitted[/bold yellow] {record['job_id']} to {address}: "
        f"{reason}",
        soft_wrap=True,
    )
    return record
