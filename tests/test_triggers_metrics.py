"""Runbook metrics to a real Pushgateway through the flow hooks, and the shipped Prometheus rules and
Alertmanager config checked by promtool (unit tests included) and amtool."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tasks.metrics import push_run_metrics, run_metrics, runbook_metrics_hooks
from tests.conftest import MonitoringDaemon

ROOT = Path(__file__).resolve().parent.parent


def scrape(gateway: MonitoringDaemon, runbook: str) -> dict[str, float]:
    text = urllib.request.urlopen(gateway.url + "/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("runbooks_") and f'runbook="{runbook}"' in line:
            out[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    return out


def test_run_metrics_success_and_failure_name_different_things() -> None:
    ok = run_metrics("backup", success=True, finished_at=1000.0, duration_seconds=12.5, size_bytes=2048)
    assert {k: v for k, (_h, v) in ok.values.items()} == {
        "runbooks_last_run_timestamp_seconds": 1000.0, "runbooks_last_run_success": 1.0,
        "runbooks_last_success_timestamp_seconds": 1000.0, "runbooks_last_run_duration_seconds": 12.5,
        "runbooks_last_run_size_bytes": 2048.0}
    bad = run_metrics("backup", success=False, finished_at=2000.0, duration_seconds=3.0)
    assert "runbooks_last_success_timestamp_seconds" not in bad.values  # a failure keeps the last success
    assert bad.values["runbooks_last_failure_timestamp_seconds"][1] == 2000.0
    assert "# TYPE runbooks_last_run_success gauge\nrunbooks_last_run_success 0.0" in bad.exposition()
    assert push_run_metrics(ok, gateway=None) is False  # not configured: nothing to do, no error


def test_a_push_reaches_the_pushgateway_under_its_runbook_label(pushgateway: MonitoringDaemon) -> None:
    metrics = run_metrics("a b/c", success=True, finished_at=1700000000.0, duration_seconds=2.5, size_bytes=10)
    assert push_run_metrics(metrics, gateway=pushgateway.url) is True
    assert scrape(pushgateway, "a b/c") == {k: v for k, (_h, v) in metrics.values.items()}
    failed = run_metrics("a b/c", success=False, finished_at=1700000100.0, duration_seconds=None)
    assert push_run_metrics(failed, gateway=pushgateway.url) is True
    after = scrape(pushgateway, "a b/c")  # a push replaces only the names it holds
    assert after["runbooks_last_success_timestamp_seconds"] == 1700000000.0
    assert after["runbooks_last_failure_timestamp_seconds"] == 1700000100.0
    assert after["runbooks_last_run_success"] == 0.0


def test_unreachable_pushgateway_never_fails_the_run() -> None:
    metrics = run_metrics("backup", success=True, finished_at=1.0, duration_seconds=1.0)
    assert push_run_metrics(metrics, gateway="http://127.0.0.1:9") is False


def test_flow_hooks_push_success_then_failure_keeps_last_success(
        pushgateway: MonitoringDaemon, prefect_harness: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import flow

    from blocks.errors import DumpFailed

    monkeypatch.setenv("RUNBOOKS_PUSHGATEWAY_URL", pushgateway.url)

    class Result:
        size = 4096

    @flow(name="metrics-hook-test", **runbook_metrics_hooks())
    def hooked(fail: bool = False) -> Result:
        if fail:
            raise DumpFailed("pg_dump exited 1")
        return Result()

    hooked()
    first = scrape(pushgateway, "metrics-hook-test")
    assert first["runbooks_last_run_success"] == 1.0
    assert first["runbooks_last_run_size_bytes"] == 4096.0
    assert first["runbooks_last_run_duration_seconds"] >= 0.0
    with pytest.raises(DumpFailed):
        hooked(fail=True)
    second = scrape(pushgateway, "metrics-hook-test")
    assert second["runbooks_last_run_success"] == 0.0
    assert second["runbooks_last_success_timestamp_seconds"] == first["runbooks_last_success_timestamp_seconds"]
    assert second["runbooks_last_failure_timestamp_seconds"] >= first["runbooks_last_success_timestamp_seconds"]


def _tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} missing: apt-get install -y prometheus prometheus-alertmanager (make system-deps)"
    return found


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    rules_dir = ROOT / "deployments/prometheus"
    for argv in (["check", "rules", "runbooks.rules.yml"], ["test", "rules", "runbooks.rules.test.yml"],
                 ["check", "config", "prometheus.example.yml"], ["check", "rules", "app.rules.example.yml"],
                 ["test", "rules", "app.rules.example.test.yml"]):
        result = subprocess.run([_tool("promtool"), *argv], cwd=rules_dir, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_example_alertmanager_config_is_valid_and_routes_to_the_authenticated_bridge() -> None:
    import yaml

    path = ROOT / "deployments/alertmanager/alertmanager.example.yml"
    result = subprocess.run([_tool("amtool"), "check-config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(path.read_text())
    [hook] = next(r for r in config["receivers"] if r["name"] == "runbooks-bridge")["webhook_configs"]
    assert hook["url"].endswith("/alertmanager") and hook["send_resolved"] is True
    assert hook["http_config"]["authorization"]["credentials_file"]
