"""What capfilt sets before Ray, Prefect, transformers or open_clip start: offline, quiet, patient.

Every process capfilt starts (the CLI, a flow imported as a library, Ray workers through their
inherited environment) gets these defaults; a variable the user already set wins, so turning any
of them back on is one `export`. They are why the first command works on a new, busy laptop:
- no component phones home (telemetry and usage reports are off, nothing is fetched unless a
  hub id or URL is named);
- Prefect's local (ephemeral) server may take the time it needs: its first start migrates a new
  SQLite database, 15-50 s on a busy 2-core machine, more than Prefect's 20 s default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

# Seconds capfilt lets Prefect's local server take to answer (Prefect's own default is 20).
PREFECT_STARTUP_TIMEOUT_S = 300

DEFAULTS: dict[str, str] = {
    # Prefect's local server sends usage analytics to the internet unless told not to.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(PREFECT_STARTUP_TIMEOUT_S),
    # Ray reports cluster usage statistics by default.
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray >= 2.47 would start every worker through `uv run` (re-resolves the env, fails offline).
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    # Hugging Face Hub telemetry; downloads still happen for hub ids a user names.
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # img2dataset imports albumentations, which checks PyPI for updates in every worker.
    "NO_ALBUMENTATIONS_UPDATE": "1",
    # wandb is installed with img2dataset; capfilt never logs to it.
    "WANDB_MODE": "disabled",
    # The common opt-out many tools honour.
    "DO_NOT_TRACK": "1",
    # tokenizers warns (once per forked Ray worker) when its thread pool meets a fork.
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_defaults(environ: MutableMapping[str, str] = os.environ, stderr=None) -> None:
    """Set every default the user has not set; call before importing Ray, Prefect or transformers."""
    for name, value in DEFAULTS.items():
        environ.setdefault(name, value)
    stderr = stderr or sys.stderr
    if not (hasattr(stderr, "isatty") and stderr.isatty()):
        # Logs going to a file or a pipe: no colour codes from Prefect's console handler (rich
        # already leaves them out for a non-terminal unless FORCE_COLOR says otherwise; this is
        # Prefect's own switch, and child processes inherit it).
        environ.setdefault("PREFECT_LOGGING_COLORS", "false")
        # Ray wraps the "(pid=...)" prefix of every worker line it forwards in colour codes,
        # terminal or not, unless told otherwise.
        environ.setdefault("RAY_COLOR_PREFIX", "0")
    if not environ.get("RAY_ADDRESS"):
        # The embedded default is a one-machine Ray: keep its processes on loopback as Ray does on
        # laptops. Left alone, Linux Ray finds "its" address by routing a socket towards 8.8.8.8 and
        # then talks to itself over the LAN address. Joining a cluster (RAY_ADDRESS) is unaffected.
        environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def names_a_ray_cluster(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether RAY_ADDRESS names a cluster to join (unset or "local": a Ray of this machine's own)."""
    return (environ.get("RAY_ADDRESS") or "local") != "local"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the OS says)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prefect_home() -> str:
    """Where Prefect keeps its settings and local database (PREFECT_HOME, else ~/.prefect)."""
    return os.environ.get("PREFECT_HOME") or os.path.join(os.path.expanduser("~"), ".prefect")
