"""A small real HTTP application for recovery tests: health (its database answers) and maintenance mode."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg


class FakeApp:
    """Serves GET /health (200 when ``db_url`` answers ``health_sql`` with true and ``healthy`` is set) and
    POST /maintenance/on|off, which need ``Authorization: Bearer <token>``; records every switch."""

    def __init__(self, db_url: str, token: str, health_sql: str = "SELECT true") -> None:
        self.db_url = db_url
        self.token = token
        self.health_sql = health_sql
        self.healthy = True
        self.maintenance = False
        self.events: list[tuple[str, float]] = []
        self.unauthorized = 0
        app = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                if self.path != "/health":
                    return self._reply(404, {})
                try:
                    with psycopg.connect(app.db_url, connect_timeout=2) as conn:
                        row = conn.execute(app.health_sql).fetchone()
                    ok = app.healthy and bool(row and row[0])
                except psycopg.Error:
                    ok = False
                self._reply(200 if ok else 503, {"ok": ok, "maintenance": app.maintenance})

            def do_POST(self) -> None:  # noqa: N802
                if self.headers.get("Authorization") != f"Bearer {app.token}":
                    app.unauthorized += 1
                    return self._reply(401, {})
                if self.path not in ("/maintenance/on", "/maintenance/off"):
                    return self._reply(404, {})
                app.maintenance = self.path.endswith("/on")
                app.events.append(("on" if app.maintenance else "off", time.monotonic()))
                self._reply(200, {"maintenance": app.maintenance})

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> FakeApp:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class ProbeApp:
    """GET /health answers 200 while ``healthy()`` is true, else 503; every request is recorded as
    (method, path, whether the expected bearer token came with it). No database: health is whatever the test
    ties it to (e.g. the image the Kubernetes double runs)."""

    def __init__(self, healthy: Callable[[], bool], token: str | None = None) -> None:
        self.healthy = healthy
        self.token = token
        self.calls: list[tuple[str, str, bool]] = []
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                authorized = app.token is None or self.headers.get("Authorization") == f"Bearer {app.token}"
                app.calls.append(("GET", self.path, authorized))
                ok = authorized and self.path.split("?")[0] == "/health" and app.healthy()
                data = json.dumps({"ok": ok}).encode()
                self.send_response(200 if ok else (401 if not authorized else 503))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def health_calls(self) -> int:
        return sum(1 for _m, path, _a in self.calls if path.startswith("/health"))

    def __enter__(self) -> ProbeApp:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
