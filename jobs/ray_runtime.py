"""Starting Ray: an embedded local Ray, or the cluster of a submitted job; Ray kept quiet.

The console shows rayline's progress, summaries and real warnings. Ray's own logs (workers,
Ray Train, Ray Data, Serve, the raylet) stay in the files of Ray's session folder, whose path
`init_ray` prints once when it starts or joins Ray.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

from jobs.config import Config

# Loggers of the driver process that only narrate Ray's internals, and the level they keep.
QUIET_LOGGERS = {
    # "Token authentication is enabled for this Ray cluster..." at every local start.
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    # "Progress bars disabled..." (we turn Ray Data's bars off on purpose; ours are in rich).
    "ray.data._internal.progress": logging.ERROR,
}


def quiet_ray_console() -> None:
    """Keeps Ray's informational logs and its internal deprecation warnings off the console.

    Warnings and errors still reach the console; Ray's log files are unaffected (Ray Data keeps
    writing everything to `ray-data.log`: only its console handler is raised to WARNING).
    """
    from ray.util.annotations import RayDeprecationWarning

    # Deprecations that Ray's own code triggers (e.g. Ray Train setting Ray Data's
    # `ExecutionOptions.exclude_resources`) are Ray's to fix; ours are still shown.
    warnings.filterwarnings("ignore", category=RayDeprecationWarning, module=r"ray(\.|$)")
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setLevel(max(handler.level, logging.WARNING))
    if "ray.serve" in sys.modules:
        # Serve's driver-side logger has no file, only the console ("Started Serve...",
        # "Application ... is ready"); its replicas and controller log to logs/serve/.
        logging.getLogger("ray.serve").setLevel(logging.WARNING)


def ray_logs_dir() -> str | None:
    """The `logs` folder of the Ray session this process is connected to (None if unknown)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public API in Ray 2.60
    try:
        return node.get_logs_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001 - only a hint for the user
        return None


def joins_cluster() -> bool:
    """True in the driver of a submitted job, which joins the job's cluster; False where
    rayline starts (and owns) an embedded local Ray."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and os.environ.get("RAY_ADDRESS"))


def init_ray(config: Config | None = None, num_cpus: int | None = None) -> float:
    """Starts or joins Ray; returns the seconds it took.

    A driver started by `ray job submit` (the job supervisor sets RAY_JOB_CONFIG_JSON_ENV_VAR
    and RAY_ADDRESS) joins its cluster; anywhere else we start an embedded local Ray rather than
    attaching to whatever cluster an exported RAY_ADDRESS happens to name.

    Neither forwards its workers' output to this console (`log_to_driver=False`): task and actor
    failures still come back as exceptions with their remote tracebacks, rayline's own code
    prints only from the driver, and everything Ray's processes print stays in the session's
    log files (on a cluster, on each node; the dashboard shows them too).
    """
    import ray

    if ray.is_initialized():
        quiet_ray_console()  # Serve may have been imported since
        return 0.0
    started = time.perf_counter()
    # Ray Train drains worker reports once per health-check interval (2 s by default); Ray Train
    # copies this variable from the driver into its controller at fit().
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    quiet_ray_console()
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if joins_cluster():
        ray.init(**quiet)
    else:
        num_cpus = num_cpus or (config.ray.num_cpus if config else None)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
    _print_logs_dir()
    from ray.data import DataContext

    quiet_ray_console()  # importing ray.data configured its loggers
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return time.perf_counter() - started


def _print_logs_dir() -> None:
    from jobs.progress import quiet

    logs = ray_logs_dir()
    if logs and not quiet():
        from jobs.summary import console

        console.print(f"[dim]Ray's own logs: {logs}[/]", highlight=False, soft_wrap=True)
