"""`prefect deploy --all` registers prefect.yaml against a real Prefect API (the session harness) with a process
work pool; every deployment keeps its schedule, parameters and tags; prefect.yaml and the registry agree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.registry import RUNBOOKS, block_slug, by_name, discover

ROOT = Path(__file__).resolve().parent.parent
SECRET = "pw-that-must-not-leak-" + "7" * 8


def prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def yaml_deployments() -> dict[str, dict[str, Any]]:
    """``flow/deployment`` -> the prefect.yaml entry (flow name taken from the registry by entrypoint module)."""
    out = {}
    for entry in prefect_yaml()["deployments"]:
        module = entry["entrypoint"].split(":")[0]
        matches = [r for r in RUNBOOKS if r.module == module and r.deployment == entry["name"]]
        assert matches, f"prefect.yaml deployment {entry['name']} ({module}) is not in deployments/registry.py"
        out[matches[0].name] = entry
    return out


def test_prefect_yaml_and_the_registry_agree() -> None:
    found, skipped = discover()
    assert skipped == [], "registry entries whose flow is missing: " + "; ".join(
        f"{s.runbook.name}: {s.reason}" for s in skipped)
    discovered = {d.runbook.name: d for d in found}
    entries = yaml_deployments()
    for name, entry in entries.items():
        runbook = by_name()[name]
        assert name in discovered, f"prefect.yaml deploys {name}, whose flow does not exist"
        assert entry["entrypoint"] == discovered[name].entrypoint
        assert [s["cron"] for s in entry.get("schedules", [])] == list(runbook.schedules)
        for schedule in entry.get("schedules", []):
            assert schedule.get("parameters", {}) == dict(runbook.schedule_parameters)
        assert sorted(entry["tags"]) == runbook.all_tags
        assert entry["description"].split()[0] and len(entry["description"]) > 40
        assert set(entry.get("parameters", {})) == set(runbook.parameters), name
        assert entry.get("concurrency_limit") == runbook.concurrency_limit, name
    missing = sorted(set(discovered) - set(entries))
    assert not missing, f"served by `runbooks serve` (deployments/registry.py) but not in prefect.yaml: {missing}"


def test_served_deployments_are_the_ones_prefect_yaml_declares() -> None:
    """What `runbooks serve` hands Prefect for each runbook (deployments/serve.py) against prefect.yaml's entry,
    every Block saved: same name, tags, default parameters, schedules (cron and parameters) and concurrency."""
    from deployments.serve import deployment_options

    found, _ = discover()
    entries = yaml_deployments()
    assert sorted(d.runbook.name for d in found) == sorted(entries)
    for item in found:
        entry = entries[item.runbook.name]
        # Every Block saved, each under an id of its own: serve refers to a saved Block by id (what the run
        # form's picker shows), prefect.yaml by slug (ids differ per server).
        ids = {s: f"id-of-{s}" for v in item.runbook.parameters.values() if (s := block_slug(v))}
        served = deployment_options(item, "UTC", ids)
        name = item.runbook.name
        assert served["name"] == entry["name"], name
        assert sorted(served["tags"]) == sorted(entry["tags"]), name
        by_id = {k: {"$ref": {"block_document_id": ids[slug]}} if (slug := block_slug(v)) else v
                 for k, v in (entry.get("parameters") or {}).items()}
        assert served["parameters"] == by_id, name
        assert served["concurrency_limit"] == entry.get("concurrency_limit"), name
        assert [(s.cron, s.timezone, s.parameters or {}) for s in served["schedules"]] == [
            (s["cron"], s["timezone"], s.get("parameters") or {}) for s in entry.get("schedules", [])], name
        assert served["enforce_parameter_schema"] is entry["enforce_parameter_schema"] is False, name


def test_schedules_in_prefect_yaml_share_one_timezone() -> None:
    """Every schedule's timezone is an alias of definitions.schedule_timezone: changed there, changed for all."""
    def child(node: yaml.Node, key: str) -> yaml.Node:
        [value] = [v for k, v in node.value if k.value == key]
        return value

    root = yaml.compose((ROOT / "prefect.yaml").read_text())
    anchored = child(child(root, "definitions"), "schedule_timezone")
    schedules = [s for d in child(root, "deployments").value for k, v in d.value if k.value == "schedules"
                 for s in v.value]
    assert len(schedules) == sum(len(r.schedules) for r in RUNBOOKS) > 0
    assert all(child(s, "timezone") is anchored for s in schedules)  # the same node: a YAML alias, not a copy
    assert anchored.value == "UTC"


@pytest.fixture(scope="module")
def deployed(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Blocks saved, a process pool created, `prefect deploy --all` run from the project root."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL

    from blocks.postgres import PostgresConnection
    from blocks.redis import RedisConnection
    from blocks.store import BackupStore

    BackupStore(path=str(tmp_path_factory.mktemp("deploy-store"))).save("backups", overwrite=True)
    PostgresConnection(host="db.internal", password=SECRET).save("app-db", overwrite=True)
    RedisConnection(host="cache.internal", password=SECRET).save("app-redis", overwrite=True)
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name="runbooks", type="process"))
        except ObjectAlreadyExists:
            pass
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "RUNBOOKS_HOME": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with get_client(sync_client=True) as client:
        return {name: client.read_deployment_by_name(name) for name in yaml_deployments()}


def test_deploy_all_registers_every_deployment_with_its_schedule(deployed: dict[str, Any]) -> None:
    assert set(deployed) >= {"backup/nightly", "restore-set/restore-set", "verify-backup/after-nightly",
                             "apply-retention/daily", "disaster-recovery/disaster-recovery"}
    for name, deployment in deployed.items():
        runbook = by_name()[name]
        assert deployment.work_pool_name == "runbooks"
        assert [s.schedule.cron for s in deployment.schedules] == list(runbook.schedules)
        assert all(s.schedule.timezone == "UTC" and s.active for s in deployment.schedules)
        assert set(deployment.tags) == set(runbook.all_tags)
        assert deployment.parameter_openapi_schema["properties"], name  # the typed form in the UI
    nightly = deployed["backup/nightly"]
    assert nightly.parameters["store"] == {"$ref": {"block_document_slug": "backup-store/backups"}}
    assert nightly.parameters["postgres"] == {"$ref": {"block_document_slug": "postgres-connection/app-db"}}
    for deployment in deployed.values():  # block references stay references: no password in parameters
        assert SECRET not in deployment.model_dump_json()
    assert nightly.parameters["include_globals"] is True
    assert deployed["apply-retention/daily"].schedules[0].parameters == {"dry_run": False}
    assert "dry_run" not in deployed["apply-retention/daily"].parameters
    assert deployed["disaster-recovery/disaster-recovery"].schedules == []


def test_a_run_from_the_deployed_defaults_is_accepted(deployed: dict[str, Any]) -> None:
    """The Run button with the defaults: Block references pass the server (the flow resolves them)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(deployed["backup/nightly"].id, parameters={"tags": ["click"]})
    assert run.parameters["tags"] == ["click"] and run.parameters["include_globals"] is True
    from flows.backup import backup

    resolved = backup.validate_parameters(run.parameters)  # what the engine does when the run starts
    assert resolved["store"].path and resolved["postgres"].host == "db.internal"
