"""The run forms as the Prefect UI gets them: `runbooks serve` against a real Prefect API (the session harness).

Every served deployment's parameter schema, read back through the API, gives each parameter a title and a
description; saved-Block defaults are sent by id (what the block picker shows), a Block saved after serve
started becomes the default; the server itself refuses a run whose parameters do not fit (the form's
"Validate parameters" box and the deployments' enforcement) and accepts the deployments' own defaults;
SIGTERM stops serve without a traceback or an un-awaited coroutine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.registry import RUNBOOKS, block_slug
from tasks.approval import APPROVE, REJECT, approval_form, refusal

ROOT = Path(__file__).resolve().parent.parent
SAVED_AT_START = {"backup-store/backups", "postgres-connection/app-db", "redis-connection/app-redis"}


def _wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def served(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Three of the registry's Blocks saved, then `runbooks serve` (every runbook) against the harness API."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from blocks.postgres import PostgresConnection
    from blocks.redis import RedisConnection
    from blocks.store import BackupStore

    home = tmp_path_factory.mktemp("forms")
    ids = {
        "backup-store/backups": BackupStore(path=str(home / "store")).save("backups", overwrite=True),
        "postgres-connection/app-db": PostgresConnection(host="db.internal").save("app-db", overwrite=True),
        "redis-connection/app-redis": RedisConnection(host="cache.internal").save("app-redis", overwrite=True),
    }
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    log_path = home / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", "serve", "--poll", "1"], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def all_served() -> dict[str, Any] | None:
        from prefect.exceptions import ObjectNotFound

        assert proc.poll() is None, log_path.read_text()
        with get_client(sync_client=True) as client:
            try:
                found = {rb.name: client.read_deployment_by_name(rb.name) for rb in RUNBOOKS}
            except ObjectNotFound:
                return None
        # serve switches enforcement on once every deployment is applied (deployments/serve.py)
        return found if all(d.enforce_parameter_schema for d in found.values()) else None

    try:
        deployments = _wait("every runbook to be served", all_served, 180)
        yield {"proc": proc, "log": log_path, "deployments": deployments, "ids": ids,
               "api": PREFECT_API_URL.value()}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_every_served_parameter_has_a_title_and_a_description(served: dict[str, Any]) -> None:
    for name, deployment in served["deployments"].items():
        properties = deployment.parameter_openapi_schema["properties"]
        assert properties, name
        for key, prop in properties.items():
            assert prop.get("title") and prop["title"] != key, f"{name}: {key} has no title of its own"
            assert len(prop.get("description", "")) >= 10, f"{name}: {key} has no description"
        dangerous = [p["title"] for p in properties.values() if p["title"].startswith("DANGER:")]
        if name in ("disaster-recovery/disaster-recovery", "rollback/rollback"):
            assert dangerous == ["DANGER: skip the approval"], name


def test_saved_block_defaults_are_sent_by_id_for_the_block_picker(served: dict[str, Any]) -> None:
    nightly = served["deployments"]["backup/nightly"]
    for param, slug in (("store", "backup-store/backups"), ("postgres", "postgres-connection/app-db"),
                        ("redis", "redis-connection/app-redis")):
        assert nightly.parameters[param] == {"$ref": {"block_document_id": str(served["ids"][slug])}}
    # not saved when serve started: left out, not a reference the run would fail to load
    assert "app" not in served["deployments"]["rollback/rollback"].parameters


def test_a_block_saved_after_serve_started_becomes_the_default(served: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client

    from blocks.app import AppEndpoint

    block_id = AppEndpoint(base_url="http://app.internal:8080").save("app", overwrite=True)

    def filled() -> bool:  # serve updates the deployments one after another
        with get_client(sync_client=True) as client:
            return all(client.read_deployment_by_name(name).parameters.get("app")
                       == {"$ref": {"block_document_id": str(block_id)}}
                       for name in ("rollback/rollback", "maintenance-window/maintenance-window"))

    _wait("serve to make the new Block the default of rollback and maintenance-window", filled, 30)


def _validate(api: str, deployment: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    """What the run form's "Validate parameters" asks the server (POST /ui/schemas/validate)."""
    answer = httpx.post(f"{api}/ui/schemas/validate", json={"schema": deployment.parameter_openapi_schema,
                                                             "values": values}, timeout=30)
    answer.raise_for_status()
    return answer.json()["errors"]


def test_the_server_accepts_the_defaults_and_refuses_a_bad_value(served: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.states import Scheduled

    api = served["api"]
    with get_client(sync_client=True) as client:
        deployments = {name: client.read_deployment_by_name(name) for name in served["deployments"]}
    nightly = deployments["backup/nightly"]
    assert _validate(api, nightly, dict(nightly.parameters)) == []
    errors = _validate(api, nightly, {**nightly.parameters, "compression_level": 40})
    assert [e["property"] for e in errors] == ["compression_level"]

    later = Scheduled(scheduled_time=datetime.now(UTC) + timedelta(days=30))  # never picked up by the runner
    assert [n for n, d in deployments.items() if not d.enforce_parameter_schema] == []
    with get_client(sync_client=True) as client:
        for name, deployment in deployments.items():
            if all(block_slug(v) is None for v in deployment.parameters.values()) and name != "backup/nightly":
                continue
            run = client.create_flow_run_from_deployment(deployment.id, state=later)  # the Run button, defaults
            assert run.parameters.keys() == deployment.parameters.keys(), name
            client.delete_flow_run(run.id)
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(nightly.id, parameters={"compression_level": 40}, state=later)
    assert refused.value.response.status_code == 409
    detail = refused.value.response.json()["detail"]
    assert "compression_level" in detail and "40 is greater than the maximum of 19" in detail


def test_the_approval_form_needs_a_decision_and_the_targets_name() -> None:
    from prefect._internal.pydantic.v2_schema import create_v2_schema
    from prefect.utilities.schema_tools.validation import validate

    form = approval_form("appdb", "Restore?")
    schema = create_v2_schema(form.__name__, model_base=form)
    assert "decision" in schema["required"] and "default" not in schema["properties"]["decision"]
    for answer, ok in (({}, False), ({"decision": APPROVE}, False),
                       ({"decision": APPROVE, "confirm_target": "x"}, False),
                       ({"decision": APPROVE, "confirm_target": "appdb"}, True), ({"decision": REJECT}, True)):
        assert (validate(answer, schema) == []) is ok, answer
    assert refusal(form(decision=APPROVE, confirm_target="appdb "), "appdb") is None
    assert "not the target's name" in refusal(form(decision=APPROVE, confirm_target="app"), "appdb")
    assert "not typed" in refusal(form(decision=APPROVE), "appdb")
    assert refusal(form(decision=REJECT), "appdb") is None


def test_sigterm_stops_serve_cleanly(served: dict[str, Any]) -> None:
    proc = served["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    log = served["log"].read_text()
    assert "SIGTERM received" in log
    assert "never awaited" not in log and "Traceback" not in log, log[-3000:]


def test_hosts_in_the_integrity_report_are_code_not_mail_links() -> None:
    from tasks.findings import summary_markdown
    from tasks.integrity import Check, SessionRow, Severity, Thresholds, session_findings

    idle = SessionRow(pid=42, database="app", user="postgres", application="psql", client="127.0.0.1",
                      state="idle in transaction", xact_seconds=7200, state_seconds=7200, backend_start="", query="-")
    findings = session_findings([idle], Thresholds())
    assert findings and "postgres@127.0.0.1" in findings[0].object
    text = summary_markdown(findings, [], databases=["app"], checks=[Check.sessions], fail_on=Severity.critical,
                            recovery=None)
    [row] = [line for line in text.splitlines() if "postgres@127.0.0.1" in line]
    assert "`pid 42 (postgres@127.0.0.1, application 'psql')`" in row  # a code span: no mailto link
