"""The alerts a window causes reach no receiver while its silence is active: a real Prometheus (Debian's) scrapes
the app's `app_maintenance` gauge and evaluates a rule that fires while the app is in maintenance; it sends the
alert to the real Alertmanager (basic auth), whose API shows it suppressed by the run's silence, and the webhook
receiver gets nothing for it until the silence has ended."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tasks.alertmanager import list_alerts
from tests.alertmanager_fixture import AM_USER
from tests.conftest import MonitoringDaemon
from tests.test_maintenance_flow import (  # noqa: F401 - fixtures
    Scene,
    _silences,
    _when,
    alertmanager,
    database,
    scene,
)
from tests.test_rollback_flow import run_record

pytestmark = pytest.mark.e2e

RULE = "AppInMaintenance"


@pytest.fixture
def prometheus(scene: Scene, tmp_path: Any) -> Iterator[MonitoringDaemon]:  # noqa: F811
    password_file = tmp_path / "am-password"
    password_file.write_text(scene.am.password)
    password_file.chmod(0o600)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "app", "rules": [{
        "alert": RULE, "expr": "app_maintenance == 1", "for": "0s", "labels": {"service": "shop"},
        "annotations": {"summary": "the app is in maintenance mode"}}]}]}))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yml")],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{scene.am.port}"]}],
                                        "basic_auth": {"username": AM_USER, "password_file": str(password_file)}}]},
        "scrape_configs": [{"job_name": "app", "static_configs": [{"targets": [scene.app.base_url[7:]]}]}]}))
    daemon = MonitoringDaemon("prometheus", lambda port, d: [
        f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={d}/data",
        f"--web.listen-address=127.0.0.1:{port}", "--rules.alert.resend-delay=1s"]).start()
    yield daemon
    daemon.stop()


def test_window_alerts_are_suppressed_while_the_silence_is_active(scene: Scene,  # noqa: F811
                                                                   prometheus: MonitoringDaemon) -> None:
    from flows.maintenance import maintenance_window

    scene.app.drain_step = 0  # the drain waits until the watcher has seen the alert suppressed
    seen: list[tuple[float, list[str]]] = []
    stop = threading.Event()

    def watch() -> None:
        block = scene.am.block()
        while not stop.is_set():
            suppressed = [a for a in list_alerts.fn(block, [f'alertname="{RULE}"'])
                          if a.state == "suppressed" and a.silenced_by]
            if suppressed:
                seen.append((time.time(), suppressed[0].silenced_by))
                scene.app.active = 0
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        state = maintenance_window(**scene.params(drain_path="/active", drain_timeout_seconds=60, take_backup=False,
                                                  restore_point=False), return_state=True)
    finally:
        stop.set()
        watcher.join(5)
    assert state.is_completed(), state.message
    _logs, _artifacts, run = run_record(state)
    [silence] = _silences(scene.am, run.name)
    assert seen and seen[0][1] == [silence["id"]]  # Prometheus fired it; the run's silence suppressed it
    ended = _when(silence["endsAt"])
    assert _when(silence["startsAt"]) <= seen[0][0] <= ended
    during = [n for t, n in zip(scene.am.receiver.received, scene.am.receiver.notifications, strict=True)
              if t < ended and any(a["labels"].get("alertname") == RULE for a in n.get("alerts", []))]
    assert during == []  # no receiver heard of it while the silence was active


def _latency(scene: Scene) -> str:  # noqa: F811
    with scene.kube.lock:
        slow = any(c["image"].endswith(":slow") for p in scene.kube.pods.values()
                   if p["metadata"]["labels"].get("app") == "api" for c in p["spec"]["containers"])
    return f"app_latency_seconds {5 if slow else 0.1}\n"


CHECKS = [{"query": "app_latency_seconds", "max": 1, "for_seconds": 3, "name": "latency"}]


def test_prometheus_checks_gate_the_new_version(scene: Scene, prometheus: MonitoringDaemon) -> None:  # noqa: F811
    from blocks.prometheus import PrometheusAPI
    from flows.maintenance import maintenance_window
    from tests.k8s_scenarios import GOOD_V1, GOOD_V2

    scene.app.extra_metrics = lambda: _latency(scene)
    common = {"prometheus": PrometheusAPI(url=prometheus.url), "checks": CHECKS, "take_backup": False,
              "restore_point": False}
    from tasks.prometheus import query_instant

    block = common["prometheus"]
    deadline = time.monotonic() + 20
    with block.get_client() as client:  # setup: Prometheus has scraped the gauge before the window
        while query_instant(client, block, "app_latency_seconds") != [0.1]:
            assert time.monotonic() < deadline, "Prometheus did not scrape app_latency_seconds"
            time.sleep(0.2)
    slow = GOOD_V2.rsplit(":", 1)[0] + ":slow"
    state = maintenance_window(**scene.params(images=[f"api={slow}"], **common), return_state=True)
    assert state.is_failed() and "check 'latency' failed" in (state.message or "")
    _logs, artifacts, run = run_record(state)
    assert scene.image() == GOOD_V1 and scene.app.switches() == ["on", "off"]  # put back, healthy, reopened
    assert _silences(scene.am, run.name)[0]["status"]["state"] == "expired"
    assert "| `latency` | 1 | 5" in artifacts["maintenance-summary"]

    state = maintenance_window(**scene.params(images=[f"api={GOOD_V2}"], **common), return_state=True)
    assert state.is_completed(), state.message
    _logs, artifacts, _run = run_record(state)
    assert scene.image() == GOOD_V2 and "| `latency` | 1 | 0.1 | pass |" in artifacts["maintenance-summary"]
