"""Starting or joining Ray the same way everywhere (CLI, flows, tests, benchmarks)."""

from __future__ import annotations

import os

# Ray >= 2.47 starts every worker through `uv run` when the driver runs under `uv run`; that
# re-resolves the environment in each worker (slow, and fails offline). The installed venv is
# already right, so turn it off before Ray is imported anywhere.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# img2dataset imports albumentations, which otherwise checks PyPI for updates in every worker.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import ray  # noqa: E402


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray in this process.

    Idempotent: does nothing when Ray is already initialised.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local" always starts a new local instance: a bare ray.init() would join any cluster
        # recorded in /tmp/ray/ray_current_cluster (someone's `ray start`), which must not
        # happen by accident.
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False


def gpus_available() -> float:
    """GPUs in the Ray cluster (0 on CPU-only machines)."""
    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
