"""Shared fixtures: a local Ray that never joins a cluster by accident, and served synthetic worlds."""

from __future__ import annotations

import os

# Set before Ray is imported anywhere (see pipeline/ray_env.py), and never join a cluster named
# by the developer's environment from a test.
os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the whole session (2 CPUs), shut down at the end."""
    import ray

    from pipeline.ray_env import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A 40-image world with every bad-URL kind, served on 127.0.0.1 for the whole session."""
    from pipeline.synth import WorldConfig, WorldServer, make_world

    directory = tmp_path_factory.mktemp("world")
    world = make_world(directory, WorldConfig(images=40, seed=7, slow_seconds=8.0, huge_side=9000))
    with WorldServer(directory) as server:
        yield {"dir": directory, "world": world, "server": server}
