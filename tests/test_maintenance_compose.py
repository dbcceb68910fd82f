"""maintenance-window on a compose service over a real sshd on loopback (tests/ssh_fixture.py: real OpenSSH,
stub `docker`), with the migration run over SSH in the project directory, the real Alertmanager and a real
HTTP app whose health follows the container the stub runs."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from blocks.app import AppEndpoint
from tests.alertmanager_fixture import Alertmanager
from tests.ssh_fixture import SshServer
from tests.test_rollback_compose import ENV, project, sshd  # noqa: F401 - fixtures
from tests.test_rollback_flow import run_record
from tests.window_app import WindowApp

pytestmark = pytest.mark.e2e

TOKEN = "app-token-" + secrets.token_hex(8)
FAST = {"poll_seconds": 0.1, "rollout_timeout_seconds": 3, "health_timeout_seconds": 2, "lock_timeout_seconds": 30,
        "take_backup": False, "restore_point": False, "migration_timeout_seconds": 30}


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alertmanager]:
    am = Alertmanager(tmp_path_factory.mktemp("alertmanager")).start()
    yield am
    am.stop()


@pytest.fixture
def app(sshd: SshServer, project: Path) -> Iterator[WindowApp]:  # noqa: F811 - fixtures
    def healthy() -> bool:
        return sshd.containers()["app"]["api"].get("health") == "healthy"

    with WindowApp(healthy, TOKEN) as served:
        yield served


def params(sshd: SshServer, project: Path, am: Alertmanager, app: WindowApp, **more: Any) -> dict[str, Any]:  # noqa: F811
    return {"reason": "api v2", "target": "compose-ssh", "ssh": sshd.block(), "compose_dir": str(project),
            "compose_project": "app", "compose_service": "api", "alertmanager": am.block(),
            "silence_matchers": ['service="api"'],
            "app": AppEndpoint(base_url=app.base_url, auth_value=SecretStr(f"Bearer {TOKEN}")), **FAST, **more}


def silence_of(am: Alertmanager, run_name: str) -> dict[str, Any]:
    with am.block().get_client() as client:
        [silence] = [s for s in client.get("/silences").json() if s["createdBy"] == f"runbooks/{run_name}"]
    return silence


def test_compose_update_and_ssh_migration(sshd, project, alertmanager, app, prefect_harness) -> None:  # noqa: F811
    from flows.maintenance import maintenance_window

    state = maintenance_window(**params(sshd, project, alertmanager, app, variables={"API_VERSION": "v2.0.0"},
                                        migration_command=["sh", "-c", "echo schema v2 > migrated.txt; echo done"]),
                               return_state=True)
    assert state.is_completed(), state.message
    _logs, artifacts, run = run_record(state)
    assert (project / ".env").read_text() == ENV.replace("v1.2.0", "v2.0.0")
    assert sshd.containers()["app"]["api"]["image"] == "registry/app:v2.0.0"
    assert (project / "migrated.txt").read_text() == "schema v2\n"  # ran in the project directory
    assert "done" in artifacts["maintenance-migration-logs"]
    assert app.switches() == ["on", "off"] and silence_of(alertmanager, run.name)["status"]["state"] == "expired"
    assert "| `API_VERSION` | `v1.2.0` | `v2.0.0` |" in artifacts["maintenance-summary"]


def test_failing_ssh_migration_puts_the_env_file_back(sshd, project, alertmanager, app, prefect_harness) -> None:  # noqa: F811
    from flows.maintenance import maintenance_window

    state = maintenance_window(**params(sshd, project, alertmanager, app, variables={"API_VERSION": "v2.0.0"},
                                        migration_command=["sh", "-c", "echo 'ERROR: column exists' >&2; exit 3"]),
                               return_state=True)
    assert state.is_failed()
    logs, artifacts, run = run_record(state)
    assert (project / ".env").read_text() == ENV  # byte for byte
    assert sshd.containers()["app"]["api"]["image"] == "registry/app:v1.2.0"
    assert "ERROR: column exists" in artifacts["maintenance-migration-logs"]
    assert "exit 3" in (state.message or "") and "migration is NOT undone" in (state.message or "")
    assert app.switches() == ["on", "off"] and silence_of(alertmanager, run.name)["status"]["state"] == "expired"
    text = "\n".join(log.message for log in logs) + str(artifacts)
    assert "env-secret-Q7x9" not in text and TOKEN not in text and alertmanager.password not in text
