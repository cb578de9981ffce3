"""Starting or joining Ray the same way everywhere (CLI, flows, tests, benchmarks)."""

from __future__ import annotations

from capfilt import logs
from capfilt.environment import apply_defaults

# Before Ray is imported anywhere: no `uv run` per worker, no usage reports (capfilt/environment.py).
apply_defaults()

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import ray  # noqa: E402


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray in this process.

    Idempotent: does nothing when Ray is already initialised.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # --quiet/--verbose (capfilt/logs.py): Ray's own logger follows; workers inherit CAPFILT_LOG_LEVEL.
    kwargs = dict(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True,
                  logging_level=logs.library_level("ray"))
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local" always starts a new local instance: a bare ray.init() would join any cluster
        # recorded in /tmp/ray/ray_current_cluster (someone's `ray start`), which must not
        # happen by accident.
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    # Bars on a terminal; in a log file Ray Data would instead print a multi-line progress block
    # every 10 s ("Total Progress: 0/?", "pending: 1 CPU") that reads as a hang. The stages print
    # their own summary line either way.
    ctx.enable_progress_bars = sys.stderr.isatty() and not logs.is_quiet()
    if not ctx.enable_progress_bars:  # and no warning that they are off: that was asked for
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx.print_on_execution_start = False


def gpus_available() -> float:
    """GPUs in the Ray cluster (0 on CPU-only machines)."""
    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
