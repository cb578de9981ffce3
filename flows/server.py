"""The Prefect API the flows report to: the user's server when PREFECT_API_URL names one, else
Prefect's local (ephemeral) server, started here before any work so a failure is one clear line.
"""

from __future__ import annotations

import time
from typing import Callable

from capfilt.environment import prefect_home
from capfilt.errors import CapfiltError

START_OWN_SERVER = ("start one with `uv run prefect server start` in another terminal and "
                    "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")


def ensure_prefect_api(echo: Callable[[str], None] = print) -> str:
    """Return the API URL flows will use, after checking that it answers; raise CapfiltError if not."""
    import httpx
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    url = PREFECT_API_URL.value()
    if url:
        try:
            httpx.get(url.rstrip("/") + "/health", timeout=10).raise_for_status()
        except httpx.HTTPError as exc:
            raise CapfiltError(
                f"the Prefect server at PREFECT_API_URL={url} does not answer ({type(exc).__name__}): start it "
                "(`uv run prefect server start`), or unset PREFECT_API_URL to let capfilt start a local one."
            ) from None
        echo(f"Prefect: using the server at {url}")
        return url
    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        raise CapfiltError("Prefect has no server to report to: PREFECT_API_URL is unset and the active profile "
                           f"turns Prefect's local server off; {START_OWN_SERVER}.")
    from prefect.server.api.server import SubprocessASGIServer

    timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    echo(f"Prefect: starting its local server (database in {prefect_home()}; a first start sets it up, "
         "up to a minute on a busy machine)")
    started = time.perf_counter()
    server = SubprocessASGIServer()  # the instance every Prefect client in this process will use
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - Prefect raises RuntimeError/HTTP errors with server output
        detail = str(exc).split(" stdout:")[0].strip().rstrip(".")
        server.stop()  # now, so its goodbye is not printed after our error
        raise CapfiltError(
            f"Prefect's local server did not start within {timeout} s ({detail}): retry, raise "
            f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or {START_OWN_SERVER}."
        ) from None
    echo(f"Prefect: local server ready at {server.address} in {time.perf_counter() - started:.0f} s")
    return server.api_url
