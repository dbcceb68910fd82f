"""A real HTTP application for maintenance-window tests: health (a callable the test ties to what runs),
maintenance on/off (bearer token) recorded with wall-clock times, and an active-work count to drain."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WindowApp:
    """GET /health: 200 while ``healthy()``; GET /metrics: ``app_maintenance 0|1``; POST /maintenance/on|off;
    GET /active: ``{"active": N}`` where N is ``active`` (each poll lowers it by ``drain_step`` while maintenance
    is on). ``events`` holds (what, time.time()) for every switch and for the first poll that answered 0."""

    def __init__(self, healthy: Callable[[], bool], token: str, active: int = 0, drain_step: int = 1) -> None:
        self.healthy = healthy
        self.token = token
        self.active = active
        self.drain_step = drain_step
        self.maintenance = False
        self.events: list[tuple[str, float]] = []
        self.unauthorized = 0
        self.extra_metrics: Callable[[], str] = lambda: ""  # more exposition lines for /metrics
        app = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {app.token}":
                    app.unauthorized += 1
                    return False
                return True

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/metrics":  # what Prometheus scrapes (no token, as a metrics port usually is)
                    data = (f"app_maintenance {int(app.maintenance)}\n" + app.extra_metrics()).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return None
                if not self._authorized():
                    return self._reply(401, {})
                if self.path == "/health":
                    ok = bool(app.healthy())
                    return self._reply(200 if ok else 503, {"ok": ok, "maintenance": app.maintenance})
                if self.path == "/active":
                    if app.maintenance and app.active > 0:
                        app.active = max(0, app.active - app.drain_step)
                    if app.active == 0 and not any(e == "drained" for e, _ in app.events):
                        app.events.append(("drained", time.time()))
                    return self._reply(200, {"active": app.active})
                self._reply(404, {})

            def do_POST(self) -> None:  # noqa: N802
                if not self._authorized():
                    return self._reply(401, {})
                if self.path not in ("/maintenance/on", "/maintenance/off"):
                    return self._reply(404, {})
                app.maintenance = self.path.endswith("/on")
                app.events.append(("on" if app.maintenance else "off", time.time()))
                self._reply(200, {"maintenance": app.maintenance})

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def switches(self) -> list[str]:
        return [e for e, _ in self.events if e in ("on", "off")]

    def when(self, event: str) -> float:
        return next(t for e, t in self.events if e == event)

    def __enter__(self) -> WindowApp:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
