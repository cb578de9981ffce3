"""Serves a world's routes (world.py) over HTTP: its images, and its bad URLs misbehaving as asked."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from capfilt.errors import ConfigError

from .world import load_world


class _Handler(BaseHTTPRequestHandler):
    server_version = "capfilt-synth/1"
    world_dir: Path
    routes: dict

    def log_message(self, format, *args):  # noqa: A002 - silence per-request logging
        pass

    def do_HEAD(self):  # noqa: N802
        self._serve(body=False)

    def do_GET(self):  # noqa: N802
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        route = self.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self.send_error(404)
            return
        kind = route["kind"]
        if kind == "status":
            self.send_error(route["code"])
            return
        if kind == "flaky":  # a server that fails its first `failures` requests, then serves the file
            route["requests"] = route.get("requests", 0) + 1
            if route["requests"] <= route["failures"]:
                self.send_error(route["code"])
                return
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", route["location"])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind == "slow":
            # Sleep in small steps so a stopping server is not held up for the whole delay.
            deadline = time.monotonic() + route["seconds"]
            while time.monotonic() < deadline and not getattr(self.server, "stopping", False):
                time.sleep(0.1)
        data = (self.world_dir / "files" / route["file"]).read_bytes()
        try:
            self.send_response(200)
            self.send_header("Content-Type", route.get("content_type", "application/octet-stream"))
            self.send_header("Content-Length", str(len(data)))
            for key, value in route.get("headers", {}).items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. timed out on a slow route)


class WorldServer:
    """Serves a world's routes on its recorded host and port, in a background thread.

    Use as a context manager in tests and the demo; `serve_forever` for `capfilt synth serve`.
    """

    def __init__(self, world_dir: str | Path, port: int | None = None):
        self.world_dir = Path(world_dir)
        world = load_world(self.world_dir)
        self.host = world["host"]
        self.port = port if port is not None else world["port"]
        routes = json.loads((self.world_dir / "routes.json").read_text())
        handler = type("WorldHandler", (_Handler,), {"world_dir": self.world_dir, "routes": routes})
        try:
            self.httpd = ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve the world on {self.host}:{self.port} ({exc.strerror}); stop whatever "
                f"uses that port, or create the world again with another --port."
            ) from exc
        self.httpd.daemon_threads = True
        self.httpd.stopping = False
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "WorldServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="capfilt-world")
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()

    def stop(self) -> None:
        self.httpd.stopping = True
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "WorldServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
