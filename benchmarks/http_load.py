"""Load-generation plumbing for benchmarks/serve.py: server process trees, wrk, CPU accounting.

A server runs as a subprocess in its own process group; stopping it ends every process it
started (Ray's workers start their own sessions, so they are found as descendants). wrk runs
in its own process; each run reports its parsed output with the CPU that wrk, the server's
processes and the rest of the machine used meanwhile, in percent of one core.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU ticks of the whole machine, from /proc/stat."""
    ticks = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def busy_percent(before: tuple[float, float]) -> float:
    """Machine CPU use since `before`, in percent of one core (2 cores busy: 200)."""
    busy, total = machine_busy()
    return round(100 * os.cpu_count() * (busy - before[0]) / max(total - before[1], 1), 1)


def post(url: str, body: bytes, token: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{url}/predict", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {}


def start(label: str, argv: list[str], env: dict, url: str, timeout_s: float, log: Path):
    """Starts a server in its own process group; returns (process, seconds until /healthz 200)."""
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            break
        # not up yet: refused (URLError is an OSError) or a 5xx from a proxy still starting
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
            if r.status == 200:
                return proc, round(time.monotonic() - started, 1)
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:]
    stop(proc)
    sys.exit(f"{label} did not answer {url}/healthz in {timeout_s:.0f} s; log {log}:\n{tail}")


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (graceful), then SIGTERM to the group, then SIGKILL to every process it started:
    Ray's workers start their own sessions, so they are found as descendants, not by group."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for sig, wait_s in ((signal.SIGINT, 45), (signal.SIGTERM, 15)):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig) if sig == signal.SIGTERM else proc.send_signal(sig)
                proc.wait(wait_s)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
    _, alive = psutil.wait_procs(family, timeout=20)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += sum(p.cpu_times()[:2])
    return total


def wrk(
    url: str, body: Path, token: str, conns: int, seconds: float, threads: int, server: list
) -> dict:
    """One wrk run, parsed; with the CPU that wrk, the server's processes and everything else
    on the machine used meanwhile (percent of one core)."""
    lua = ROOT / "benchmarks" / "wrk_post.lua"
    argv = ["wrk", f"-t{min(threads, conns)}", f"-c{conns}", f"-d{seconds:g}s", "--latency"]
    argv += ["--timeout", "10s", "-s", str(lua), f"{url}/predict", "--", str(body), token]
    machine, started, server_cpu = machine_busy(), time.monotonic(), cpu_seconds(server)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    server_cpu = cpu_seconds(server) - server_cpu
    if status != 0 or "Requests/sec" not in text:
        raise RuntimeError(f"wrk failed:\n{text}")
    pct = {
        int(p): round(float(v) * UNITS_MS[u], 2)
        for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    }
    requests = int(re.search(r"(\d+) requests in", text).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    wrk_cpu = 100 * (usage.ru_utime + usage.ru_stime) / wall
    cell = {
        "req_s": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
        "requests": requests,
        "p50_ms": pct.get(50),
        "p99_ms": pct.get(99),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": socket_errors.group(1).strip() if socket_errors else "",
        "wrk_cpu_pct": round(wrk_cpu, 1),
        "server_cpu_pct": round(100 * server_cpu / wall, 1),
        "server_cpu_ms_per_req": round(1000 * server_cpu / max(requests, 1), 2),
        "machine_cpu_pct": busy_percent(machine),
    }
    cell["other_cpu_pct"] = round(cell["machine_cpu_pct"] - cell["server_cpu_pct"] - wrk_cpu, 1)
    return cell


def background(opts: dict, label: str) -> float:
    """Machine CPU% over 2 s, waiting up to `quiet_wait` s for it to drop to `max_background`."""
    deadline = time.monotonic() + opts["quiet_wait"]
    while True:
        before = machine_busy()
        time.sleep(2)
        busy = busy_percent(before)
        if busy <= opts["max_background"] or time.monotonic() > deadline:
            return busy
        print(f"  {label}: waiting for a quieter machine ({busy}% busy)", flush=True)
