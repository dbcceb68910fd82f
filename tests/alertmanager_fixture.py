"""A real Alertmanager (Debian's prometheus-alertmanager) on loopback behind basic auth, routing every alert
to a webhook receiver this module serves, so a test sees exactly which notifications reached a receiver."""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr

from tests.conftest import MonitoringDaemon

AM_USER = "runbooks"


class Receiver:
    """The webhook receiver: records every notification body Alertmanager sends."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self.received: list[float] = []  # time.time() of each notification
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.received.append(time.time())
                receiver.notifications.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hook"

    def alert_names(self) -> list[str]:
        return [a["labels"].get("alertname", "") for n in self.notifications for a in n.get("alerts", [])]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Alertmanager:
    """The daemon, its receiver and the password of its basic auth (kept out of argv: web config, bcrypt)."""

    def __init__(self, work: Path) -> None:
        import bcrypt

        self.password = "am-pass-" + secrets.token_hex(8)
        self.receiver = Receiver()
        hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
        (work / "web.yml").write_text(yaml.safe_dump({"basic_auth_users": {AM_USER: hashed}}))
        (work / "alertmanager.yml").write_text(yaml.safe_dump({
            "route": {"receiver": "hook", "group_by": ["alertname"], "group_wait": "1s", "group_interval": "1s",
                      "repeat_interval": "2s"},
            "receivers": [{"name": "hook", "webhook_configs": [{"url": self.receiver.url, "send_resolved": True}]}],
        }))
        self.auth = "Basic " + base64.b64encode(f"{AM_USER}:{self.password}".encode()).decode()
        self.daemon = MonitoringDaemon("prometheus-alertmanager", lambda port, d: [
            f"--config.file={work / 'alertmanager.yml'}", f"--web.config.file={work / 'web.yml'}",
            f"--storage.path={d}", f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
            ready_headers={"Authorization": self.auth})

    def start(self) -> Alertmanager:
        self.daemon.start()
        return self

    def stop(self) -> None:
        self.daemon.stop()
        self.receiver.stop()

    @property
    def url(self) -> str:
        return self.daemon.url

    @property
    def port(self) -> int:
        return self.daemon.port

    def block(self):  # -> AlertmanagerAPI; Prefect loads only for tests that ask
        from blocks.alertmanager import AlertmanagerAPI

        return AlertmanagerAPI(url=self.url, username=AM_USER, password=SecretStr(self.password))

    def post_alert(self, labels: dict[str, str], minutes: float = 10) -> None:
        """Send an alert straight to the API (what Prometheus does), ending in ``minutes``."""
        import urllib.request
        from datetime import UTC, datetime, timedelta

        end = (datetime.now(UTC) + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")
        request = urllib.request.Request(f"{self.url}/api/v2/alerts", method="POST",
                                         data=json.dumps([{"labels": labels, "endsAt": end}]).encode(),
                                         headers={"Content-Type": "application/json", "Authorization": self.auth})
        urllib.request.urlopen(request, timeout=5).close()
