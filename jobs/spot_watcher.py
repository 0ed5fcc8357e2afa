"""`rayline spot-watcher`: turns a cloud's spot interruption notice into a Ray drain.

Ray does not read cloud metadata by itself, so without this a spot node vanishes with tasks
and actors on it. With it, the GCS learns of the loss seconds to minutes ahead (reason
PREEMPTION plus the deadline), stops placing work there, and Ray Train's preemption handling
can checkpoint in time. One watcher runs next to `ray start` on each spot worker.

- AWS (IMDSv2): PUT a session token, then GET `spot/instance-action` (404 until a notice, then
  `{"action": ..., "time": ...}`; about 2 minutes of notice). A rebalance recommendation is
  only logged: it is an early hint, not a loss.
- GCP: GET `instance/preempted` (`FALSE`/`TRUE`, about 30 s of notice), then hang on it with
  `wait_for_change` + `last_etag`, so the notice arrives as soon as the server has it.

A flaky metadata server costs a log line per new problem, never the watcher. After the drain is
accepted the watcher exits 0: the node is going away and one drain per notice is enough; a
drain that fails (GCS unreachable, rejected) is retried on the next poll.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from datetime import datetime, timezone
from typing import Annotated

import requests
import typer

from jobs.errors import ConfigError

log = logging.getLogger("rayline.spot_watcher")
UTC = timezone.utc  # datetime.UTC is Python 3.11+; cluster images may run 3.10

AWS_BASE = "http://169.254.169.254"
GCP_BASE = "http://metadata.google.internal"
TOKEN_TTL_S = 21600
AWS_MAX_NOTICE_S = 120.0  # AWS gives two minutes; a later time means a skewed clock
GCP_NOTICE_S = 30.0
HTTP_TIMEOUT_S = 2.0


class MetadataError(Exception):
    """The metadata server answered something we cannot read (logged, then polled again)."""


class AwsPoller:
    """IMDSv2 `spot/instance-action`: `poll()` is None until a notice, then seconds left."""

    def __init__(self, base: str = AWS_BASE, session: requests.Session | None = None) -> None:
        self.base = base.rstrip("/")
        self.session = session or requests.Session()
        self.token: str | None = None
        self.token_expires = 0.0
        self.rebalance_seen = False
        self.notice: dict | None = None

    def _token(self, refresh: bool = False) -> str:
        # Renew a minute before the TTL runs out, so a GET never carries a stale token.
        if refresh or self.token is None or time.monotonic() > self.token_expires - 60:
            response = self.session.put(
                f"{self.base}/latest/api/token",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)},
                timeout=HTTP_TIMEOUT_S,
            )
            if response.status_code != 200:
                raise MetadataError(f"IMDSv2 token request answered {response.status_code}")
            self.token = response.text.strip()
            self.token_expires = time.monotonic() + TOKEN_TTL_S
        return self.token

    def _get(self, path: str) -> requests.Response:
        url = f"{self.base}/latest/meta-data/{path}"
        response = self.session.get(
            url, headers={"X-aws-ec2-metadata-token": self._token()}, timeout=HTTP_TIMEOUT_S
        )
        if response.status_code == 401:  # token expired or the instance metadata restarted
            headers = {"X-aws-ec2-metadata-token": self._token(refresh=True)}
            response = self.session.get(url, headers=headers, timeout=HTTP_TIMEOUT_S)
        return response

    def poll(self) -> float | None:
        """Seconds until the interruption (0..120), or None while there is no notice. The notice
        is read first: a slow or broken rebalance endpoint must never hide it."""
        response = self._get("spot/instance-action")
        if response.status_code == 404:
            try:
                self._check_rebalance()
            except (requests.RequestException, MetadataError) as error:
                log.info("rebalance recommendation unreadable: %s", type(error).__name__)
            return None
        if response.status_code != 200:
            raise MetadataError(f"spot/instance-action answered {response.status_code}")
        try:
            notice = json.loads(response.text)
            when = datetime.fromisoformat(notice["time"].replace("Z", "+00:00"))
            action = str(notice["action"])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise MetadataError(
                f"spot/instance-action is not JSON with 'action' and 'time' "
                f"({type(error).__name__}: {error}): {response.text[:200]!r}"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        self.notice = {"action": action, "time": notice["time"]}
        left = (when - datetime.now(UTC)).total_seconds()
        return min(max(left, 0.0), AWS_MAX_NOTICE_S)

    def _check_rebalance(self) -> None:
        # Only a hint that interruption risk went up: logged once, never drained on.
        if self.rebalance_seen:
            return
        response = self._get("events/recommendations/rebalance")
        if response.status_code == 200:
            self.rebalance_seen = True
            log.warning("AWS rebalance recommendation (no drain yet): %s", response.text[:200])

    def describe(self) -> str:
        notice = self.notice or {}
        return f"AWS spot interruption: {notice.get('action')} at {notice.get('time')}"


class GcpPoller:
    """GCE `instance/preempted`: `poll()` is None until preempted, then the notice seconds."""

    def __init__(
        self,
        base: str = GCP_BASE,
        notice_s: float = GCP_NOTICE_S,
        wait_s: float = 0.0,
        session: requests.Session | None = None,
    ) -> None:
        self.base = base.rstrip("/")
        self.notice_s = notice_s
        self.wait_s = wait_s
        self.session = session or requests.Session()
        self.since: float | None = None
        self.etag: str | None = None

    def poll(self) -> float | None:
        """`notice_s` minus the time since we first saw TRUE, or None while not preempted."""
        params = {}
        if self.etag and self.wait_s >= 1:  # hang until the value moves past this ETag
            params = {
                "wait_for_change": "true",
                "last_etag": self.etag,
                "timeout_sec": str(int(self.wait_s)),
            }
        response = self.session.get(
            f"{self.base}/computeMetadata/v1/instance/preempted",
            params=params,
            headers={"Metadata-Flavor": "Google"},
            timeout=HTTP_TIMEOUT_S + self.wait_s,
        )
        if response.status_code != 200:
            raise MetadataError(f"instance/preempted answered {response.status_code}")
        self.etag = response.headers.get("ETag")
        value = response.text.strip().upper()
        if value == "FALSE":
            return None
        if value != "TRUE":
            raise MetadataError(f"instance/preempted is neither TRUE nor FALSE: {value[:50]!r}")
        self.since = self.since or time.monotonic()
        return max(self.notice_s - (time.monotonic() - self.since), 0.0)

    def describe(self) -> str:
        return "GCP preemption notice (instance/preempted is TRUE)"


def local_node_id(address: str) -> str:
    """The one alive Ray node on this machine's IP; ambiguous (several nodes per IP) is an
    error, since draining the wrong node is worse than draining none."""
    import ray
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    ip = ray.util.get_node_ip_address()
    nodes = GcsClient(address=address).get_all_node_info()
    alive = [
        node_id.hex()
        for node_id, info in nodes.items()
        if info.node_manager_address == ip and info.state == GcsNodeInfo.ALIVE
    ]
    if len(alive) != 1:
        raise ConfigError(f"{len(alive)} alive Ray nodes at {ip}: pass --node-id")
    return alive[0]


def drain(address: str, node_id: str, message: str, seconds_left: float) -> tuple[bool, str]:
    """Asks the GCS to drain `node_id` for preemption, with the deadline in epoch ms.

    The same call `ray drain-node` makes, without a subprocess and the CLI's import time
    (seconds a 30 s notice cannot spare); returns (accepted, rejection message)."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    deadline_ms = time.time_ns() // 1_000_000 + int(seconds_left * 1000)
    accepted, rejection = GcsClient(address=address).drain_node(
        node_id,
        autoscaler_pb2.DrainNodeReason.DRAIN_NODE_REASON_PREEMPTION,
        message,
        deadline_ms,
    )
    return bool(accepted), str(rejection)


def watch(
    poller: AwsPoller | GcpPoller,
    address: str,
    node_id: str | None,
    interval_s: float,
    max_polls: int | None = None,
) -> bool:
    """Polls until a notice is drained (True) or `max_polls` polls pass (False)."""
    polls = 0
    last_error, last_logged = "", 0.0
    while max_polls is None or polls < max_polls:
        polls += 1
        started = time.monotonic()
        try:
            seconds_left = poller.poll()
            if last_error:
                log.warning("metadata: answering again")
                last_error = ""
        except (requests.RequestException, MetadataError) as error:
            seconds_left = None
            # One line per new problem (and one a minute while it lasts), not one per poll.
            text = _one_line(error, poller.base)
            if text != last_error or started - last_logged > 60:
                log.warning("metadata: %s", text)
                last_error, last_logged = text, started
        if seconds_left is not None:
            message = poller.describe()
            try:
                node_id = node_id or local_node_id(address)
                accepted, rejection = drain(address, node_id, message, seconds_left)
            except Exception as error:  # noqa: BLE001 - GCS down or node gone: retry next poll
                accepted, rejection = False, _one_line(error, address)
            if accepted:
                log.warning("drained node %s: %s, %.0f s left", node_id, message, seconds_left)
                return True
            log.warning("drain of node %s not accepted: %s", node_id, rejection)
        time.sleep(max(interval_s - (time.monotonic() - started), 0.0))
    return False


def _one_line(error: BaseException, base: str = "") -> str:
    if isinstance(error, requests.ConnectionError | requests.Timeout):  # urllib3's text is long
        return f"{base or 'server'} unreachable ({type(error).__name__})"
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:300]}"


def main(
    cloud: Annotated[str, typer.Option(help="Which metadata server to poll: aws or gcp")],
    metadata_url: Annotated[
        str | None, typer.Option(help="Metadata server base URL (tests); default: the cloud's")
    ] = None,
    interval_s: Annotated[float, typer.Option(help="Seconds between polls")] = 5.0,
    address: Annotated[
        str | None, typer.Option(help="GCS address host:port; default: the local Ray cluster")
    ] = None,
    node_id: Annotated[
        str | None, typer.Option(help="Hex Ray node id to drain; default: the node at this IP")
    ] = None,
    gcp_notice_s: Annotated[float, typer.Option(help="Deadline after a GCP notice")] = 30.0,
) -> None:
    """Polls the cloud's spot interruption notice and drains this Ray node when it comes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s spot-watcher %(message)s")
    if cloud not in ("aws", "gcp"):
        raise ConfigError(f"--cloud must be aws or gcp, got {cloud!r}")
    if not (math.isfinite(interval_s) and interval_s > 0):
        raise ConfigError(f"--interval-s must be a positive number of seconds, got {interval_s}")
    if not (math.isfinite(gcp_notice_s) and gcp_notice_s >= 0):
        raise ConfigError(f"--gcp-notice-s must be a number of seconds >= 0, got {gcp_notice_s}")
    if node_id is not None and not re.fullmatch(r"[0-9a-f]{56}", node_id):
        raise ConfigError(f"--node-id must be a 56-digit hex Ray node id, got {node_id!r}")
    if address is None:
        from ray._private.services import canonicalize_bootstrap_address

        try:
            address = canonicalize_bootstrap_address(None)
        except (ValueError, ConnectionError) as error:
            raise ConfigError(f"no local Ray cluster ({error}): pass --address") from None
        if address is None:
            raise ConfigError("no running Ray cluster found here: pass --address host:port")
    if cloud == "aws":
        poller: AwsPoller | GcpPoller = AwsPoller(metadata_url or AWS_BASE)
    else:
        poller = GcpPoller(metadata_url or GCP_BASE, notice_s=gcp_notice_s, wait_s=interval_s)
    if node_id is None:  # resolve now so a problem shows at start, not when the notice comes
        try:
            node_id = local_node_id(address)
        except Exception as error:  # noqa: BLE001 - retried when the notice comes
            log.warning("no node id yet (retried on a notice): %s", _one_line(error, address))
    log.info("watching %s metadata at %s for node %s at %s", cloud, poller.base, node_id, address)
    watch(poller, address, node_id, interval_s)


if __name__ == "__main__":
    from jobs.entrypoint import run_cli

    run_cli(main)
