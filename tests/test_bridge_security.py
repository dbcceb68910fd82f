"""The bridge's echoes are bounded and escaped, it has exactly one bearer token source, and it serves HTTPS
(optionally mutual TLS) to the real Alertmanager, with a CA made in the test."""

from __future__ import annotations

import json
import logging
import os
import secrets
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr
from starlette.testclient import TestClient

from deployments.bridge.app import create_app
from deployments.bridge.config import BridgeConfig
from deployments.bridge.runs import PrefectRunStarter
from deployments.routes import compile_routes, printable
from deployments.webhook import config_from_args, tls_options
from tasks.process import stop_process
from tasks.scratch import free_port
from tests.conftest import MonitoringDaemon
from tests.tls import TestCA

TOKEN = "bridge-security-token-" + "y" * 16
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLOSED_API = "http://127.0.0.1:9/api"


def payload(*alerts: dict[str, Any]) -> dict[str, Any]:
    return {"version": "4", "groupKey": "{}", "truncatedAlerts": 0, "status": "firing", "receiver": "r",
            "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "", "alerts": list(alerts)}


def alert(labels: dict[str, str], fingerprint: str = "abc") -> dict[str, Any]:
    return {"status": "firing", "labels": labels, "annotations": {}, "startsAt": "2026-11-20T02:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "", "fingerprint": fingerprint}


@pytest.fixture
def offline() -> Iterator[TestClient]:
    routes = compile_routes({"routes": [{"name": "r", "alertname": "Other", "deployment": "x/y"}]}, lambda _n: False)
    app = create_app(BridgeConfig(routes=routes, tokens=[SecretStr(TOKEN)]), PrefectRunStarter(CLOSED_API))
    with TestClient(app) as client:
        yield client


def _no_control(text: str) -> bool:
    return all(c.isprintable() for c in text)


def test_printable_escapes_control_characters_and_bounds_length():
    assert printable("a\nb\rc\x1b[31m\u2028\x00") == "a\\nb\\rc\\x1b[31m\\u2028\\x00"
    assert printable("x" * 1000, 10) == "xxxxxxxxxx...(1000 characters)"
    assert printable("Backup fehlt: café") == "Backup fehlt: café"


def test_a_huge_label_name_with_newlines_gives_a_short_escaped_answer_and_log_line(offline, caplog):
    name = "forged\n2026-12-01 INFO runbooks.webhook accepted everything\n" + "z" * 900_000
    body = payload(alert({"alertname": "X", name: "v"}))
    with caplog.at_level(logging.WARNING, logger="runbooks.webhook"):
        response = offline.post("/alertmanager", content=json.dumps(body), headers=AUTH)
    assert response.status_code == 400
    assert len(response.content) < 2000, len(response.content)
    error = response.json()["error"]
    assert "forged\\n2026-12-01" in error and _no_control(error) and "characters)" in error
    [record] = [r for r in caplog.records if r.getMessage().startswith("400")]
    line = record.getMessage()
    assert len(line) < 2000 and "\n" not in line and "forged\\n" in line


def test_alert_names_and_fingerprints_are_escaped_in_the_answer_and_the_log(offline, caplog):
    name = "Evil\nINFO forged line\x1b[2J" + "n" * 5000
    with caplog.at_level(logging.INFO, logger="runbooks.webhook"):
        response = offline.post("/alertmanager", content=json.dumps(payload(alert({"alertname": name}, "f\nx"))),
                                headers=AUTH)
    assert response.status_code == 202
    text = response.text
    assert len(text) < 4000 and "\\n" in text
    for entry in response.json()["skipped"]:
        assert all(_no_control(str(v)) for v in entry.values())
    assert all("\n" not in r.getMessage() and "\x1b" not in r.getMessage() for r in caplog.records)


# -- exactly one token source ------------------------------------------------------------------------------


def _args(tmp_path: Path, token_file: str | None) -> Namespace:
    return Namespace(routes=None, token_file=token_file, basic_auth_file=None, max_body_bytes=1024,
                     respond_within=0.03, retry_for=900.0)


def test_the_bridge_takes_exactly_one_token_source(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("file-token-0123456789abcdef\n")
    token_file.chmod(0o600)
    monkeypatch.setenv("RUNBOOKS_WEBHOOK_TOKEN", "env-token-0123456789abcdef")
    with pytest.raises(ValueError, match="exactly one bearer token"):
        config_from_args(_args(tmp_path, str(token_file)))
    only_env = config_from_args(_args(tmp_path, None))
    assert [t.get_secret_value() for t in only_env.tokens] == ["env-token-0123456789abcdef"]
    monkeypatch.delenv("RUNBOOKS_WEBHOOK_TOKEN")
    only_file = config_from_args(_args(tmp_path, str(token_file)))
    assert [t.get_secret_value() for t in only_file.tokens] == ["file-token-0123456789abcdef"]


def test_up_generates_a_token_only_when_no_source_is_given(tmp_path):
    from deployments.serve import bridge_token_source

    env = {"RUNBOOKS_WEBHOOK_TOKEN": "env-token-0123456789abcdef"}
    assert bridge_token_source(tmp_path, None, env) == (None, "bearer token from $RUNBOOKS_WEBHOOK_TOKEN")
    assert not (tmp_path / "webhook-token").exists()
    with pytest.raises(ValueError, match="exactly one"):
        bridge_token_source(tmp_path, "/etc/token", env)
    assert bridge_token_source(tmp_path, "/etc/token", {}) == ("/etc/token", "bearer token in /etc/token")
    old = os.umask(0)
    try:
        path, note = bridge_token_source(tmp_path, None, {})
    finally:
        os.umask(old)
    assert path == str(tmp_path / "webhook-token") and "generated" in note
    assert (tmp_path / "webhook-token").stat().st_mode & 0o777 == 0o600
    assert len((tmp_path / "webhook-token").read_text().strip()) >= 32


# -- HTTPS and mutual TLS ----------------------------------------------------------------------------------


def test_tls_options_refuse_half_configurations(tmp_path):
    ca = TestCA(tmp_path / "ca")
    server = ca.issue("bridge")
    assert tls_options(None, None, None) == {}
    with pytest.raises(ValueError, match="go together"):
        tls_options(server.cert, None, None)
    with pytest.raises(ValueError, match="needs --tls-cert"):
        tls_options(None, None, ca.cert)
    other = TestCA(tmp_path / "other", "other CA").issue("other")
    with pytest.raises(ValueError, match="not usable"):
        tls_options(server.cert, other.key, None)  # a key that does not match the certificate
    options = tls_options(server.cert, server.key, ca.cert)
    assert options["ssl_cert_reqs"] == ssl.CERT_REQUIRED and options["ssl_ca_certs"] == ca.cert


class BridgeProcess:
    def __init__(self, tmp: Path, ca: TestCA, *, client_ca: bool) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.server = ca.issue("runbooks-bridge")
        self.client = ca.issue("alertmanager", client=True)
        self.ca = ca
        routes = {"routes": [{"name": "never", "alertname": "NotThisOne", "deployment": "x/y",
                               "require_approval": True}]}
        (tmp / "routes.yaml").write_text(yaml.safe_dump(routes))
        argv = [sys.executable, "-m", "deployments.cli", "webhook", "--port", str(self.port), "--routes",
                str(tmp / "routes.yaml"), "--tls-cert", self.server.cert, "--tls-key", self.server.key]
        if client_ca:
            argv += ["--tls-client-ca", ca.cert]
        env = {**os.environ, "RUNBOOKS_WEBHOOK_TOKEN": TOKEN, "PREFECT_API_URL": CLOSED_API}
        env.pop("RUNBOOKS_WEBHOOK_TOKEN_FILE", None)
        self.log = tmp / "bridge.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def context(self, *, with_client_cert: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca.cert)
        if with_client_cert:
            context.load_cert_chain(self.client.cert, self.client.key)
        return context

    def get(self, path: str, **kwargs: Any) -> str:
        with urllib.request.urlopen(self.url + path, timeout=5, context=self.context(**kwargs)) as response:
            return response.read().decode()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"bridge exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                self.get("/healthz")
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"bridge not ready: {self.log.read_text()}")

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)


@pytest.mark.e2e
def test_alertmanager_posts_to_the_bridge_over_mutual_tls(tmp_path):
    """The real Alertmanager with tls_config (ca_file, cert_file, key_file) delivers to the bridge over HTTPS;
    a client without a certificate, one that does not trust the CA, and plain HTTP all fail."""
    ca = TestCA(tmp_path / "ca")
    bridge = BridgeProcess(tmp_path, ca, client_ca=True)
    alertmanager = None
    try:
        bridge.wait_ready()
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionResetError)):
            bridge.get("/healthz", with_client_cert=False)
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(bridge.url + "/healthz", timeout=5, context=ssl.create_default_context())
        with pytest.raises((urllib.error.URLError, ConnectionResetError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{bridge.port}/healthz", timeout=5)

        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        token_file.chmod(0o600)
        config = {
            "route": {"receiver": "bridge", "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "bridge", "webhook_configs": [{
                "url": bridge.url + "/alertmanager", "send_resolved": False,
                "http_config": {"authorization": {"type": "Bearer", "credentials_file": str(token_file)},
                                "tls_config": {"ca_file": ca.cert, "cert_file": bridge.client.cert,
                                               "key_file": bridge.client.key}}}]}],
        }
        (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config))
        alertmanager = MonitoringDaemon("prometheus-alertmanager", lambda port, d: [
            f"--config.file={tmp_path / 'alertmanager.yml'}", f"--storage.path={d}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="]).start()
        fire = json.dumps([{"labels": {"alertname": "TlsProbe", "instance": secrets.token_hex(4)}}]).encode()
        request = urllib.request.Request(alertmanager.url + "/api/v2/alerts", data=fire, method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5).close()
        deadline = time.monotonic() + 60
        while bridge.metric("runbooks_bridge_notifications_received_total") < 1:
            assert time.monotonic() < deadline, f"no notification arrived:\n{alertmanager.log_tail()}"
            time.sleep(0.5)
        assert bridge.metric('runbooks_bridge_alerts_received_total{status="firing"}') >= 1
        assert bridge.metric('runbooks_bridge_requests_rejected_total{reason="unauthorized"}') == 0
    finally:
        if alertmanager is not None:
            alertmanager.stop()
        bridge.stop()
    assert "https://127.0.0.1" in bridge.log.read_text()
