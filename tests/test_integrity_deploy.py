"""The shipped `db-integrity-check/weekly` deployment end to end: prefect.yaml's parameters (Block references
resolved as a run resolves them) against a real cluster, healthy and then with a damaged index; and the shipped
alert route's parameters, which the flow must accept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.registry import by_name
from deployments.routes import load_routes
from tasks.findings import Check, Severity
from tasks.scratch import ScratchPostgres
from tests.test_integrity import GARBAGE_INDEX, INDEX_BLOCK, connect, corrupt, create_database

ROOT = Path(__file__).resolve().parent.parent


def shipped_entry() -> dict[str, Any]:
    entries = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    [entry] = [e for e in entries if e["entrypoint"] == "flows/integrity.py:db_integrity_check"]
    return entry


def test_shipped_deployment_is_weekly_and_changes_nothing_by_default() -> None:
    entry = shipped_entry()
    assert entry["name"] == "weekly" and [s["cron"] for s in entry["schedules"]] == ["0 3 * * 6"]
    runbook = by_name()["db-integrity-check/weekly"]
    assert dict(runbook.parameters) == entry["parameters"] and not runbook.destructive
    switches = ("reindex", "terminate_idle_in_transaction", "terminate_idle_sessions", "vacuum_stale_tables")
    assert not any(entry["parameters"].get(s) for s in switches)


def test_shipped_deployment_defaults_on_a_real_cluster(prefect_harness: None,
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    from blocks.postgres import PostgresConnection
    from blocks.store import BackupStore
    from flows.integrity import db_integrity_check

    entry = shipped_entry()
    with ScratchPostgres(fast=True) as server:
        create_database(server, "app", rows=20000)
        PostgresConnection.from_url(server.url).save("app-db", overwrite=True)
        BackupStore(path=str(tmp_path_factory.mktemp("deploy-store"))).save("backups", overwrite=True)
        params = db_integrity_check.validate_parameters(dict(entry["parameters"]))  # what a run's start does
        assert params["postgres"].port == server.port and params["install_amcheck"] is True

        state = db_integrity_check(**params, return_state=True)
        assert state.is_completed(), state.message
        report = state.result()
        assert set(report.databases) == {"app", "postgres"} and report.checks == list(Check)
        assert [f for f in report.findings if f.severity.rank > Severity.info.rank] == []
        for database in report.databases:  # install_amcheck: true in the deployment
            with connect(server, database) as conn:
                assert conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'").fetchone() == (1,)

        with connect(server, "app") as conn:
            filenode = conn.execute("SELECT relfilenode FROM pg_class WHERE relname = 't_pkey'").fetchone()
        corrupt(server, [("app", "t_pkey", INDEX_BLOCK, GARBAGE_INDEX)])
        state = db_integrity_check(**params, return_state=True)
        assert state.is_failed() and "public.t_pkey" in state.message
        report = state.result(raise_on_failure=False).report
        assert [(f.check, f.object) for f in report.findings if f.severity == Severity.critical][:1] == \
            [(Check.amcheck, "public.t_pkey")]
        assert report.remediations == []  # the schedule reports; it does not reindex
        assert "No backup set to restore from" not in (report.recovery or "")  # an index: no restore needed
        with connect(server, "app") as conn:
            assert conn.execute("SELECT relfilenode FROM pg_class WHERE relname = 't_pkey'").fetchone() == filenode


def test_shipped_pool_exhausted_route_parameters_are_accepted_by_the_flow(
        prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    from blocks.postgres import PostgresConnection
    from blocks.store import BackupStore
    from flows.integrity import db_integrity_check

    PostgresConnection(host="db.internal").save("app-db", overwrite=True)
    BackupStore(path=str(tmp_path_factory.mktemp("route-store"))).save("backups", overwrite=True)

    routes = load_routes((ROOT / "deployments/routes.example.yaml").read_text(), lambda name: False)
    [route] = [r for r in routes if r.name == "connection-pool-exhausted"]
    assert route.deployment == "db-integrity-check/weekly"
    merged = {**shipped_entry()["parameters"], **route.parameters}
    params = db_integrity_check.validate_parameters(merged)
    assert params["checks"] == [Check.sessions, Check.replication]
    assert params["terminate_idle_in_transaction"] and params["terminate_idle_sessions"]
    assert not params["reindex"] and not params["vacuum_stale_tables"]
    assert params["thresholds"].idle_session_minutes == 10 and params["thresholds"].idle_in_transaction_minutes == 5
    assert params["thresholds"].xid_age_critical == 1_000_000_000  # the rest keep their defaults
    assert params["postgres"].host == "db.internal"
