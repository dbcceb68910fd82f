"""Pure parts of maintenance-window: the migration Job built from a pod template, Job states, job names,
active-work counts."""

from __future__ import annotations

import pytest

from blocks.errors import ConfigurationError, RunbookError
from tasks.drain import count_of
from tasks.kubernetes_jobs import job_name, job_state, migration_job_body

SECRET_ENV = [{"name": "DB", "valueFrom": {"secretKeyRef": {"name": "db", "key": "url"}}}]
API = {"name": "api", "image": "app:v1", "args": ["serve"], "ports": [{"containerPort": 80}],
       "readinessProbe": {"httpGet": {"path": "/health"}}, "env": SECRET_ENV}
TEMPLATE = {"metadata": {"labels": {"app": "api"}, "annotations": {"x": "y"}},
            "spec": {"serviceAccountName": "api", "containers": [API, {"name": "proxy", "image": "envoy:1"}]}}


def test_migration_job_keeps_the_environment_and_drops_what_serves() -> None:
    body = migration_job_body("migrate-x", TEMPLATE, "api", "app:v2", ["alembic", "upgrade", "head"],
                              {"w": "run"}, 600)
    pod = body["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["image"] == "app:v2" and container["command"] == ["alembic", "upgrade", "head"]
    assert "args" not in container and "ports" not in container and "readinessProbe" not in container
    assert container["env"] == TEMPLATE["spec"]["containers"][0]["env"]  # the Secret reference, as it was
    assert pod["spec"]["serviceAccountName"] == "api" and pod["spec"]["restartPolicy"] == "Never"
    assert pod["metadata"]["labels"] == {"w": "run", "job-name": "migrate-x"}  # no Service selects it
    assert body["spec"]["backoffLimit"] == 0 and body["spec"]["activeDeadlineSeconds"] == 600
    assert TEMPLATE["spec"]["containers"][0]["image"] == "app:v1"  # the recorded template is not changed
    with pytest.raises(ConfigurationError):
        migration_job_body("m", TEMPLATE, "nope", "app:v2", ["x"], {}, 60)
    with pytest.raises(ConfigurationError):
        migration_job_body("m", TEMPLATE, "api", "app:v2", [], {}, 60)


def test_job_states_and_names() -> None:
    assert job_state({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}) == (True, "Complete")
    failed = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
              "message": "Job was active longer than specified"}
    done, why = job_state({"status": {"conditions": [failed]}})
    assert done is False and why.startswith("DeadlineExceeded")
    assert job_state({"status": {"active": 1}}) == (None, "1 pod(s) active")
    name = job_name("migrate", "Celestial_Kelpie " + "x" * 80)
    assert len(name) <= 63 and name.startswith("migrate-celestial-kelpie-") and not name.endswith("-")


def test_active_work_counts() -> None:
    assert count_of(3, "active") == 3 and count_of({"active": 0}, "active") == 0
    assert count_of({"queue": {"in_flight": 2}}, "queue.in_flight") == 2
    for bad in [{"other": 1}, {"active": -1}, {"active": True}, {"active": "3"}]:
        with pytest.raises(RunbookError):
            count_of(bad, "active")
