"""The Prefect API with basic auth under `runbooks up`: an unauthenticated call gets 401, while the served runbooks,
the bridge (HTTPS, its one token from $RUNBOOKS_WEBHOOK_TOKEN, no generated file) and the UI keep working; bound
beyond loopback without an auth string, `up` refuses to start."""

from __future__ import annotations

import base64
import json
import os
import secrets
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.process import stop_process
from tasks.scratch import free_port
from tests.tls import TestCA

pytestmark = pytest.mark.e2e


def _call(url: str, *, auth: str | None = None, body: Any = None, token: str | None = None,
          context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _up(home: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(home / "up.log", "wb")  # noqa: SIM115 - the child writes to it
    proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", "up", "--home", str(home / "state"), *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(home),
                            start_new_session=True)
    log.close()
    return proc


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_SERVER_API",
                                                                      "RUNBOOKS_WEBHOOK", "RUNBOOKS_PUSHGATEWAY"))}
    return {**env, **extra}


def test_up_bound_beyond_loopback_refuses_to_start_without_an_auth_string(tmp_path):
    done = subprocess.run([sys.executable, "-m", "deployments.cli", "up", "--home", str(tmp_path / "state"),
                           "--host", "0.0.0.0", "--port", str(free_port())], env=_clean_env(),  # noqa: S104
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "without authentication" in done.stderr and "--api-auth-file" in done.stderr
    assert not (tmp_path / "state" / "prefect.db").exists()
    assert not (tmp_path / "state" / "webhook-token").exists()  # nothing generated either


def test_with_api_auth_unauthenticated_calls_get_401_and_runbooks_bridge_and_ui_still_work(tmp_path):
    auth = "runbooks:" + secrets.token_urlsafe(24)
    token = secrets.token_urlsafe(24)
    store, media = tmp_path / "store", tmp_path / "media"
    media.mkdir()
    for i in range(5):
        (media / f"f{i}.bin").write_bytes(secrets.token_bytes(2048))
    routes = {"routes": [{"name": "backup-now", "alertname": "BackupNow", "deployment": "backup/nightly",
                          "parameters": {"paths": [str(media)], "store": {"backend": "local", "path": str(store)},
                                         "tags": ["auth-e2e"]}}]}
    (tmp_path / "routes.yaml").write_text(yaml.safe_dump(routes))
    ca = TestCA(tmp_path / "ca")
    bridge_cert = ca.issue("runbooks-bridge")
    tls = ssl.create_default_context(cafile=ca.cert)
    auth_file = tmp_path / "api-auth"
    auth_file.write_text(auth + "\n")
    auth_file.chmod(0o600)
    port, webhook_port = free_port(), free_port()
    proc = _up(tmp_path, "--port", str(port), "--webhook-port", str(webhook_port), "--routes",
               str(tmp_path / "routes.yaml"), "--api-auth-file", str(auth_file), "--only", "backup", "--poll", "1",
               "--webhook-tls-cert", bridge_cert.cert, "--webhook-tls-key", bridge_cert.key,
               env=_clean_env(RUNBOOKS_WEBHOOK_TOKEN=token))
    api, bridge = f"http://127.0.0.1:{port}/api", f"https://127.0.0.1:{webhook_port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            try:
                if (_call(f"{api}/deployments/name/backup/nightly", auth=auth)[0] == 200
                        and _call(f"{bridge}/healthz", context=tls)[0] == 200):
                    break
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(1)
        up_log = (tmp_path / "up.log").read_text()
        assert "API basic auth on" in up_log and "bearer token from $RUNBOOKS_WEBHOOK_TOKEN" in up_log
        assert f"https://127.0.0.1:{webhook_port}/alertmanager" in up_log
        assert auth.split(":")[1] not in up_log and token not in up_log
        assert not (tmp_path / "state" / "webhook-token").exists()

        # The API: 401 without the auth string (or with a wrong one), health open for probes.
        assert _call(f"{api}/deployments/filter", body={})[0] == 401
        assert _call(f"{api}/deployments/filter", body={}, auth="runbooks:wrong-password-0123")[0] == 401
        assert _call(f"{api}/flow_runs/filter", body={})[0] == 401
        assert _call(f"{api}/health")[0] == 200
        # The UI's pages are served (it asks for the auth string in the browser).
        status, page = _call(f"http://127.0.0.1:{port}/")
        assert status == 200 and b"<html" in page.lower()

        # The bridge: only the env token; it creates the run through the authenticated API.
        body = {"version": "4", "groupKey": "{}", "truncatedAlerts": 0, "status": "firing", "receiver": "r",
                "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "",
                "alerts": [{"status": "firing", "labels": {"alertname": "BackupNow"}, "annotations": {},
                            "startsAt": "2026-11-20T02:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
                            "generatorURL": "", "fingerprint": secrets.token_hex(8)}]}
        assert _call(f"{bridge}/alertmanager", body=body, token="not-the-token-0123456789", context=tls)[0] == 401
        status, answer = _call(f"{bridge}/alertmanager", body=body, token=token, context=tls)
        assert status == 202, answer
        assert len(json.loads(answer)["created"] + json.loads(answer)["pending"]) == 1
        # The served runbook runs it to completion (the runner also talks to the API with the auth string).
        wanted = {"flow_runs": {"tags": {"all_": ["route:backup-now"]}}}
        deadline = time.monotonic() + 180
        while True:
            status, data = _call(f"{api}/flow_runs/filter", body=wanted, auth=auth)
            assert status == 200
            states = [r["state"]["type"] for r in json.loads(data)]
            state = states[0] if len(states) == 1 else None
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.monotonic() < deadline, (tmp_path / "state" / "serve.log").read_text()[-3000:]
            time.sleep(1)
        assert state == "COMPLETED", (tmp_path / "state" / "serve.log").read_text()[-3000:]
        from blocks.store import BackupStore
        from tasks.store import list_sets

        [backup] = [m for m in list_sets(BackupStore.from_url(f"file://{store}").get_client())
                    if "auth-e2e" in m.tags]
        assert backup.part("files") is not None
    finally:
        stop_process(proc, timeout=60, group=True)
