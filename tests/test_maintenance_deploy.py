"""The shipped `maintenance-window` deployment end to end: prefect.yaml's parameters (Block references resolved
as a run resolves them: kubernetes-cluster/app, app-endpoint/app, alertmanager-api/alertmanager,
postgres-connection/app-db, backup-store/backups) plus what an operator types into the run's form, against the
Kubernetes double with Jobs, the real Alertmanager, PostgreSQL and a local store; every other parameter is the
flow's default (backup and restore point on, abort on a drain timeout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.registry import by_name
from tests.k8s_scenarios import GOOD_V2
from tests.test_maintenance_flow import (  # noqa: F401 - fixtures
    DB,
    MIGRATE,
    Scene,
    _silences,
    alertmanager,
    database,
    scene,
)
from tests.test_rollback_flow import run_record

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def shipped_entry() -> dict[str, Any]:
    entries = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    [entry] = [e for e in entries if e["entrypoint"] == "flows/maintenance.py:maintenance_window"]
    return entry


def test_shipped_entry_matches_the_registry() -> None:
    entry = shipped_entry()
    runbook = by_name()["maintenance-window/maintenance-window"]
    assert dict(runbook.parameters) == entry["parameters"] and runbook.destructive
    assert entry["concurrency_limit"] == 1 and "schedules" not in entry


def test_shipped_deployment_defaults(scene: Scene) -> None:  # noqa: F811
    from flows.maintenance import maintenance_window

    scene.cluster.save("app", overwrite=True)
    scene.endpoint().save("app", overwrite=True)
    scene.am.block().save("alertmanager", overwrite=True)
    scene.pg.save("app-db", overwrite=True)
    scene.store.save("backups", overwrite=True)
    form = {"reason": "v2 with the currency column", "deployments": ["api"], "images": [f"api={GOOD_V2}"],
            "migration_command": MIGRATE, "silence_matchers": ['service="shop"'], "backup_databases": [DB],
            "poll_seconds": 0.1, "health_timeout_seconds": 5}
    params = maintenance_window.validate_parameters({**shipped_entry()["parameters"], **form})
    assert params["cluster"].namespace == "shop" and params["store"].path == scene.store.path
    assert params["take_backup"] is True and params["restore_point"] is True and params["on_drain_timeout"] == "abort"

    state = maintenance_window(**params, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    _logs, artifacts, run = run_record(state)
    assert scene.image() == GOOD_V2 and "currency" in scene.columns()
    assert result.backup_set_id and result.restore_point == f"maintenance-{run.name}"
    assert scene.app.switches() == ["on", "off"]
    [silence] = _silences(scene.am, run.name)
    assert silence["status"]["state"] == "expired"
    assert result.backup_set_id in artifacts["maintenance-summary"]
