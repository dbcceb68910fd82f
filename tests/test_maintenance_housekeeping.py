"""Housekeeping mode of maintenance-window over the real sshd (tests/ssh_fixture.py): the parsers on the tools'
real output, then a window with apt-get -s upgrade, certificate expiry (real openssl certificates), df and
logrotate (Debian's) on the host, each step's result in the summary; a step that cannot run (the fixture's
`docker` simulates compose only) stops the window before any update and reopens it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tasks.housekeeping import parse_apt_summary, parse_df, parse_enddate, parse_reclaimed
from tests.ssh_fixture import SshServer
from tests.test_maintenance_compose import TOKEN, alertmanager, silence_of  # noqa: F401 - fixtures
from tests.test_rollback_flow import run_record
from tests.window_app import WindowApp

pytestmark = pytest.mark.e2e


def test_parsers_on_the_tools_output() -> None:
    apt = subprocess.run(["apt-get", "-s", "upgrade"], capture_output=True, text=True, env={"LC_ALL": "C",
                         "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}, check=True).stdout
    upgraded, _new, _remove, _held = parse_apt_summary(apt)
    assert upgraded == apt.count("\nInst ")
    assert parse_enddate("notAfter=Mar  1 12:00:05 2027 GMT\n") == datetime(2027, 3, 1, 12, 0, 5, tzinfo=UTC)
    df = subprocess.run(["df", "-P", "/"], capture_output=True, text=True, check=True).stdout
    [(mount, used)] = parse_df(df)
    assert mount == "/" and 0 <= used <= 100
    docker = ("Deleted Containers:\n4a7f7eebae0f63178aff7eb0aa39cd3f0627a203ab2df258c1a00b456cf20063\n\n"
              "Total reclaimed space: 212 B\n")
    assert parse_reclaimed(docker) == "212" and parse_reclaimed("Total reclaimed space: 1.2GB") == "1.2GB"


@pytest.fixture
def sshd() -> Iterator[SshServer]:
    with SshServer() as server:
        yield server


@pytest.fixture
def app() -> Iterator[WindowApp]:
    with WindowApp(lambda: True, TOKEN) as served:
        yield served


def certificate(directory: Path, name: str, days: int) -> str:
    path = directory / f"{name}.pem"
    key = str(directory / f"{name}.key")
    argv = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", str(path),
            "-days", str(days), "-subj", f"/CN={name}"]
    subprocess.run(argv, check=True, capture_output=True)
    return str(path)


def params(sshd: SshServer, am: Any, app: WindowApp, **more: Any) -> dict[str, Any]:
    from pydantic import SecretStr

    from blocks.app import AppEndpoint

    return {"reason": "monthly checklist", "target": "none", "ssh": sshd.block(), "alertmanager": am.block(),
            "silence_matchers": ['service="host"'], "take_backup": False, "restore_point": False,
            "app": AppEndpoint(base_url=app.base_url, auth_value=SecretStr(f"Bearer {TOKEN}")),
            "poll_seconds": 0.1, "health_timeout_seconds": 2, "lock_timeout_seconds": 30, **more}


def test_housekeeping_window_records_every_step(sshd, alertmanager, app, tmp_path, prefect_harness) -> None:  # noqa: F811
    from flows.maintenance import maintenance_window

    soon, later = certificate(tmp_path, "soon", 5), certificate(tmp_path, "later", 400)
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    (logs / "app.log").write_text("line\n" * 100)
    (tmp_path / "logrotate.conf").write_text(f"{logs}/app.log {{\n  rotate 3\n  size 1\n  missingok\n}}\n")
    state = maintenance_window(**params(
        sshd, alertmanager, app, housekeeping=["apt-upgrade", "certificate-expiry", "disk-usage", "log-rotation"],
        certificates=[soon, later], certificate_min_days=14, disk_paths=["/"], disk_max_percent=100,
        logrotate_config=str(tmp_path / "logrotate.conf"), logrotate_state=str(tmp_path / "logrotate.state")),
        return_state=True)
    assert state.is_failed()  # the window closed normally; the expiring certificate fails the run
    message = state.message or ""
    assert "closed normally" in message and f"{soon} expires" in message and later not in message
    _logs, artifacts, run = run_record(state)
    steps = {row["step"]: row["result"] for row in _rows(artifacts["maintenance-steps"])}
    assert steps["housekeeping: apt-upgrade"].startswith("ok: would upgrade")
    assert steps["housekeeping: certificate-expiry"].startswith("FINDING: ")
    assert steps["housekeeping: disk-usage"].startswith("ok: / ")
    assert steps["housekeeping: log-rotation"] == "ok: 1 file(s) rotated"
    assert (logs / "app.log.1").read_text() == "line\n" * 100  # logrotate really ran on the host
    output = artifacts["maintenance-housekeeping"]
    assert "notAfter=" in output and "upgraded, " in output and "Capacity" in output
    assert app.switches() == ["on", "off"]
    assert silence_of(alertmanager, run.name)["status"]["state"] == "expired"


def test_a_housekeeping_step_that_cannot_run_reopens(sshd, alertmanager, app, prefect_harness) -> None:  # noqa: F811
    from flows.maintenance import maintenance_window

    state = maintenance_window(**params(sshd, alertmanager, app, housekeeping=["disk-usage", "container-prune"]),
                               return_state=True)
    assert state.is_failed() and "housekeeping step container-prune failed" in (state.message or "")
    _logs, artifacts, run = run_record(state)
    assert "only `docker compose` is simulated" in artifacts["maintenance-housekeeping"]
    assert app.switches() == ["on", "off"]
    assert silence_of(alertmanager, run.name)["status"]["state"] == "expired"


def _rows(data: Any) -> list[dict[str, Any]]:
    import json

    return json.loads(data) if isinstance(data, str) else data
