"""Connecting to Ray: an existing cluster when RAY_ADDRESS is set, else a local one sized to this machine."""

from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Connects once per process; later calls are no-ops, so every pipeline can call it.

    Ray Data's own progress bars are turned off: reconray shows one bar per stage (`pipelines.console`). A local Ray
    runs without the dashboard unless `dashboard` asks for it: Ray Train frees the workers of a run whose driver died
    (an rlr trial that ASHA stopped) only after the State API, which the dashboard serves, says the driver is gone.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        logger.info("connected to the Ray cluster at %s (%g CPUs, %g GPUs)", address,
                    ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard)
        logger.info("started a local Ray with %d CPUs", num_cpus or os.cpu_count())
    ray.data.DataContext.get_current().enable_progress_bars = False

