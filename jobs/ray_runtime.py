"""Starting Ray: an embedded local Ray, or the cluster of a submitted job; Ray kept quiet."""

from __future__ import annotations

import logging
import os
import time

from jobs.config import Config


def init_ray(config: Config | None = None, num_cpus: int | None = None) -> float:
    """Starts or joins Ray; returns the seconds it took.

    A driver started by `ray job submit` (the job supervisor sets RAY_JOB_CONFIG_JSON_ENV_VAR
    and RAY_ADDRESS) joins its cluster; anywhere else we start an embedded local Ray rather than
    attaching to whatever cluster an exported RAY_ADDRESS happens to name.
    """
    import ray

    if ray.is_initialized():
        return 0.0
    started = time.perf_counter()
    # Ray Train drains worker reports once per health-check interval (2 s by default); Ray Train
    # copies this variable from the driver into its controller at fit().
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        num_cpus = num_cpus or (config.ray.num_cpus if config else None)
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return time.perf_counter() - started
