"""Connecting to Ray: an existing cluster when RAY_ADDRESS is set, else a local one sized to this machine."""

from __future__ import annotations

import os

import ray


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connects once per process; later calls are no-ops, so every pipeline can call it."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
