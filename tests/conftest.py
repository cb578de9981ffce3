"""Shared fixtures: a local Ray that never joins a cluster by accident, and served synthetic worlds."""

from __future__ import annotations

import os

# The environment the tests were started in: what a user has. Tests of user-facing commands
# (the demo test) run their subprocess in exactly this, not in what is set below.
USER_ENV = dict(os.environ)

from capfilt.environment import apply_defaults  # noqa: E402

# What every capfilt command sets for its users (offline, patient Prefect): tests that call
# library code in-process get the same, no more.
apply_defaults()
# Never join a cluster named by the developer's environment from a test.
os.environ.pop("RAY_ADDRESS", None)
# In-process unit tests load only local folders; should one ever name a hub id by mistake, fail at
# once instead of retrying against a hub these machines cannot reach. The demo test runs without
# it and audits every connection its process tree makes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
    from model.toy.server import WorldServer
    from model.toy.world import WorldConfig, make_world

    directory = tmp_path_factory.mktemp("world")
    world = make_world(directory, WorldConfig(images=40, seed=7, slow_seconds=8.0, huge_side=9000))
    with WorldServer(directory) as server:
        yield {"dir": directory, "world": world, "server": server}


@pytest.fixture(autouse=True)
def _log_handlers_on_open_streams():
    """After each test, point log handlers left on a closed stream back at the current stderr.

    Libraries build their console handlers on the sys.stderr of the moment (Prefect's rich console,
    transformers, Ray): created while a test's capsys capture was active, they keep that capture's
    file, closed when the test ends, and a later test's flow run fails writing its log line to it.
    Users never meet this: their stderr is not swapped per test.
    """
    yield
    import logging
    import sys

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            stream = getattr(handler, "stream", None)
            if stream is not None and getattr(stream, "closed", False):
                handler.stream = sys.stderr  # not setStream: it flushes the closed stream first
            console = getattr(handler, "console", None)
            if console is not None and getattr(getattr(console, "file", None), "closed", False):
                console.file = sys.stderr
