"""A real multi-node Ray cluster on loopback, for tests: a head and worker nodes, each a
`ray start --block` process with its own ports, CPUs and labels.

Every process is this harness's own: a private temp dir, free ports, a private worker port
range per node. Nodes are stopped by signalling their own `ray start --block` process (SIGTERM
for a clean stop, SIGKILL for a lost machine), never with `ray stop`; at the end any process
whose command line names the private temp dir is killed.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from tests.conftest import ROOT, free_port, pids_mentioning

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180
NODE_NAME_LABEL = "rayline.test/node"
OBJECT_STORE_BYTES = 300 * 1024**2  # per node: several nodes share this machine's /dev/shm


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    labels: dict[str, str]
    log: Path
    node_id: str = ""


@dataclass
class LocalCluster:
    """Start with `start_head`, add nodes with `add_worker`, end with `shutdown`."""

    temp_dir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="rl-mn-", dir="/tmp"))
    )
    extra_env: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    gcs_port: int = 0
    dashboard_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment of every node and of `ray job submit` / `serve deploy` calls:
        rayline importable (like an image with it installed), no token auth, no usage stats."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        env.update(
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONPATH=str(ROOT),
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            **self.extra_env,
        )
        return env

    def _node_ports(self) -> list[str]:
        first = random.randrange(20_000, 29_000, 100)
        flags = [
            "--node-manager-port", "--object-manager-port", "--metrics-export-port",
            "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
        ]  # fmt: skip
        args = []
        for flag in flags:
            args += [flag, str(free_port())]
        return args + ["--min-worker-port", str(first), "--max-worker-port", str(first + 99)]

    def _start(self, name: str, args: list[str], labels: dict[str, str]) -> Node:
        labels = {**labels, NODE_NAME_LABEL: name}
        label_arg = ",".join(f"{k}={v}" for k, v in labels.items())
        log = self.temp_dir / f"{name}.log"
        command = [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats",
                   "--labels", label_arg, "--object-store-memory", str(OBJECT_STORE_BYTES),
                   *args, *self._node_ports()]  # fmt: skip
        with log.open("w") as out:
            process = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                       cwd=self.temp_dir, start_new_session=True)  # fmt: skip
        node = Node(name, process, labels, log)
        self.nodes[name] = node
        node.node_id = self._wait_for_node(node)
        return node

    def start_head(self, cpus: int = 0, labels: dict[str, str] | None = None) -> Node:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        args = [
            "--head", "--port", str(self.gcs_port), "--num-cpus", str(cpus),
            "--temp-dir", str(self.temp_dir), "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(free_port()),
        ]  # fmt: skip
        node = self._start("head", args, labels or {})
        self._wait_for_dashboard()
        return node

    def add_worker(
        self, name: str, cpus: int, labels: dict[str, str], resources: str | None = None
    ) -> Node:
        args = ["--address", self.address, "--num-cpus", str(cpus)]
        if resources:
            args += ["--resources", resources]
        return self._start(name, args, labels)

    def list_nodes(self) -> list[dict]:
        """Ray's state API (`ray list nodes --detail`), dead nodes included."""
        response = requests.get(
            f"{self.dashboard}/api/v0/nodes", params={"detail": 1, "limit": 1000}, timeout=30
        )
        response.raise_for_status()
        return response.json()["data"]["result"]["result"]

    def list_actors(self, class_name: str = "") -> list[dict]:
        params = {"detail": 1, "limit": 10000}
        if class_name:
            params["filter_keys"], params["filter_predicates"] = "class_name", "="
            params["filter_values"] = class_name
        response = requests.get(f"{self.dashboard}/api/v0/actors", params=params, timeout=30)
        response.raise_for_status()
        return response.json()["data"]["result"]["result"]

    def node_name(self, node_id: str) -> str:
        """The harness name of a node id (via its label)."""
        for node in self.nodes.values():
            if node.node_id == node_id:
                return node.name
        return "?"

    def _wait_for_dashboard(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive(self.nodes["head"])
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.dashboard}/api/version", timeout=5).status_code == 200:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"dashboard did not answer:\n{self.nodes['head'].log.read_text()}")

    def _check_alive(self, node: Node) -> None:
        if node.process.poll() is not None:
            raise RuntimeError(
                f"ray start for {node.name} exited with {node.process.returncode}:\n"
                + node.log.read_text(errors="replace")
            )

    def _wait_for_node(self, node: Node) -> str:
        """The new node's id, once the GCS lists it alive (found by its name label)."""
        from ray._raylet import GcsClient

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive(node)
            with contextlib.suppress(Exception):
                infos = GcsClient(address=self.address).get_all_node_info(timeout=5).values()
                for info in infos:
                    if info.state == 0 and info.labels.get(NODE_NAME_LABEL) == node.name:
                        return info.node_id.hex()
            time.sleep(0.5)
        raise TimeoutError(f"node {node.name} did not join:\n{node.log.read_text()}")

    def stop_node(self, name: str, sig: int = signal.SIGTERM, wait_s: float = 60) -> None:
        """Stops one node by its own process. SIGTERM is a clean stop; if the node's processes
        are not all gone within `wait_s`, the machine is powered off: every process of the
        node is SIGKILLed, as SIGKILL does at once (a lost machine)."""
        node = self.nodes[name]
        if node.process.poll() is not None:
            return
        tree = self._node_processes(node)  # before the signal: orphans lose their parent link
        if sig != signal.SIGKILL:
            node.process.send_signal(sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and any(_alive(p) for p in tree):
                tree += [c for c in self._node_processes(node) if c not in tree]
                time.sleep(0.2)
        for process in tree:
            with contextlib.suppress(psutil.Error):
                process.kill()
        node.process.wait(timeout=30)

    def _node_processes(self, node: Node) -> list[psutil.Process]:
        """The node's `ray start` process and every process under it (raylet, agents, workers)."""
        try:
            root = psutil.Process(node.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def shutdown(self) -> list[int]:
        """Stops workers, then the head; returns processes that had to be killed after."""
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            if name in self.nodes:
                self.stop_node(name)
        time.sleep(2)  # children exit after their parent
        leftovers = pids_mentioning(str(self.temp_dir))
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return leftovers
