"""The `maintenance-window` flow end to end: the real Alertmanager (Debian's, basic auth), the real
`kubernetes` client against the API double with Jobs (tests/k8s_jobs_double.py: the migration Job's command
really runs against the test's PostgreSQL), a real HTTP app (tests/window_app.py), the real `backup` flow
into a local store from the session's PostgreSQL and Redis, and the Prefect test harness."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from pydantic import SecretStr

from blocks.app import AppEndpoint
from blocks.postgres import PostgresConnection
from blocks.redis import RedisConnection
from blocks.store import BackupStore
from tests.alertmanager_fixture import Alertmanager
from tests.k8s_jobs_double import JobsDouble
from tests.k8s_scenarios import GOOD_V1, GOOD_V2, make_deployment, read
from tests.test_rollback_flow import run_record
from tests.window_app import WindowApp

pytestmark = pytest.mark.e2e

APP_TOKEN = "app-token-" + secrets.token_hex(8)
DB = "shop_maint"
MATCHERS = ['service="shop"']
FAST = {"poll_seconds": 0.05, "rollout_timeout_seconds": 20, "health_timeout_seconds": 2,
        "check_interval_seconds": 0.5, "lock_timeout_seconds": 30, "drain_poll_seconds": 0.05,
        "drain_timeout_seconds": 5, "migration_timeout_seconds": 30, "expected_minutes": 30}


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alertmanager]:
    am = Alertmanager(tmp_path_factory.mktemp("alertmanager")).start()
    yield am
    am.stop()


@pytest.fixture(scope="module")
def database(pg: Any) -> PostgresConnection:
    conn = PostgresConnection.from_url(pg.url)
    with conn.connect(autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB}")
        admin.execute(f"CREATE DATABASE {DB}")
    with conn.connect(DB, autocommit=True) as db:
        db.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric)")
        db.execute("INSERT INTO orders SELECT g, g * 1.5 FROM generate_series(1, 500) g")
    return conn


class Scene:
    def __init__(self, cluster: Any, kube: JobsDouble, app: WindowApp, pg: PostgresConnection, store: BackupStore,
                 am: Alertmanager) -> None:
        self.cluster, self.kube, self.app, self.pg, self.store, self.am = cluster, kube, app, pg, store, am
        self.broke = False  # set once a pod ran an image tagged `unhealthy` ...
        self.sticky = True  # ... and its damage outlives the rollback unless this is False

    def endpoint(self) -> AppEndpoint:
        return AppEndpoint(base_url=self.app.base_url, auth_value=SecretStr(f"Bearer {APP_TOKEN}"))

    def image(self) -> str:
        return read(self.cluster, "api")["spec"]["template"]["spec"]["containers"][0]["image"]

    def params(self, **more: Any) -> dict[str, Any]:
        return {"reason": "upgrade to v2", "target": "kubernetes", "cluster": self.cluster, "deployments": ["api"],
                "alertmanager": self.am.block(), "silence_matchers": MATCHERS, "app": self.endpoint(),
                "postgres": self.pg, "store": self.store, "backup_databases": [DB], **FAST, **more}

    def columns(self) -> set[str]:
        with self.pg.connect(DB) as conn:
            return {r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'orders'")}


@pytest.fixture
def scene(database: PostgresConnection, alertmanager: Alertmanager, tmp_path: Any,
          prefect_harness: None) -> Iterator[Scene]:
    with JobsDouble() as kube:
        cluster_holder: dict[str, Any] = {}

        def healthy() -> bool:
            with kube.lock:
                running = [c["image"] for p in kube.pods.values() if p["metadata"]["labels"].get("app") == "api"
                           for c in p["spec"]["containers"]]
            scene = cluster_holder["scene"]
            if any(i.endswith(":unhealthy") for i in running):
                scene.broke = True
                return False
            return not (scene.broke and scene.sticky)

        with WindowApp(healthy, APP_TOKEN, active=3) as app:
            from blocks.kubernetes import KubernetesCluster

            cluster = KubernetesCluster(kubeconfig=SecretStr(kube.kubeconfig("shop")), namespace="shop")
            # the app's environment: what the migration Job inherits (the password is a literal env value here,
            # as a Secret-backed variable would be on a real cluster)
            env = {"PGHOST": database.host, "PGPORT": str(database.port), "PGUSER": database.user,
                   "PGDATABASE": DB, "PGPASSWORD": database.password.get_secret_value()}  # type: ignore[union-attr]
            make_deployment(cluster, "api", [(GOOD_V1, env)])
            store = BackupStore.from_url(f"file://{tmp_path}/store")
            s = Scene(cluster, kube, app, database, store, alertmanager)
            cluster_holder["scene"] = s
            yield s


def _when(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _silences(am: Alertmanager, run_name: str) -> list[dict[str, Any]]:
    with am.block().get_client() as client:
        return [s for s in client.get("/silences").json() if s["createdBy"] == f"runbooks/{run_name}"]


def _no_secrets(scene: Scene, logs: list[Any], artifacts: dict[str, Any], message: str) -> None:
    text = "\n".join(str(getattr(line, "message", line)) for line in logs) + "\n".join(
        str(v) for v in artifacts.values()) + message
    for secret in [APP_TOKEN, scene.am.password, scene.pg.password.get_secret_value()]:  # type: ignore[union-attr]
        assert secret not in text


MIGRATE = ["psql", "-v", "ON_ERROR_STOP=1", "-c", "ALTER TABLE orders ADD COLUMN IF NOT EXISTS currency text "
           "NOT NULL DEFAULT 'EUR'; SELECT 'migrated ' || count(*) FROM orders"]


def test_happy_path_in_order(scene: Scene, redis_server: Any) -> None:
    from flows.maintenance import maintenance_window
    from tasks.store import list_sets

    redis = RedisConnection(host=redis_server.host, port=redis_server.port,
                            password=SecretStr(redis_server.password))
    state = maintenance_window(**scene.params(images=[f"api={GOOD_V2}"], migration_command=MIGRATE,
                                              drain_path="/active", redis=redis), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    logs, artifacts, run = run_record(state)
    # the fixtures' own records, in order
    [silence] = _silences(scene.am, run.name)
    assert silence["status"]["state"] == "expired"
    created = _when(silence["startsAt"])
    sets = list_sets(scene.store.get_client())
    [backup_set] = [m for m in sets if m.set_id == result.backup_set_id]
    assert {p.name for p in backup_set.parts} >= {DB}
    assert any(p.kind == "redis" for p in backup_set.parts)
    with scene.pg.connect(autocommit=True) as conn:
        lsn_ok = conn.execute("SELECT pg_current_wal_lsn() >= %s::pg_lsn", (result.restore_point_lsn,)).fetchone()
    assert lsn_ok == (True,) and result.restore_point == f"maintenance-{run.name}"
    first_patch = min(t for t, m, p in scene.kube.timeline if m == "PATCH" and p.endswith("/deployments/api"))
    [(job_key, job_done)] = list(scene.kube.job_finished.items())
    assert scene.kube.jobs[job_key]["status"]["succeeded"] == 1
    on, drained, off = scene.app.when("on"), scene.app.when("drained"), scene.app.when("off")
    expired = _when(silence["endsAt"])
    assert created <= on < drained < backup_set.completed_at.timestamp() < first_patch < job_done < off <= expired
    assert scene.app.switches() == ["on", "off"]
    # the update and the migration really happened
    assert scene.image() == GOOD_V2
    assert "currency" in scene.columns()
    job = scene.kube.jobs[job_key]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == GOOD_V2  # from the new image
    assert job["spec"]["backoffLimit"] == 0
    assert "migrated 500" in artifacts["maintenance-migration-logs"]
    # the summary: every step timed, backup set, restore point, images before/after
    steps = {row["step"]: row for row in _table(artifacts["maintenance-steps"])}
    for name in ["silence", "maintenance on", "drain", "backup", "restore point", "update", "migration", "health",
                 "maintenance off", "expire silence"]:
        assert steps[name]["result"].startswith(("ok", "drained", "set ", "maintenance-", "api=", "succeeded")), \
            (name, steps[name])
        assert float(steps[name]["seconds"]) >= 0
    summary = artifacts["maintenance-summary"]
    assert result.backup_set_id in summary and result.restore_point in summary
    assert f"`{GOOD_V1}` | `{GOOD_V2}`" in summary
    _no_secrets(scene, logs, artifacts, state.message or "")


def _table(data: Any) -> list[dict[str, Any]]:
    import json

    return json.loads(data) if isinstance(data, str) else data


def test_failing_migration_rolls_the_images_back_and_names_the_way_back(scene: Scene) -> None:
    from flows.maintenance import maintenance_window

    broken = ["psql", "-v", "ON_ERROR_STOP=1", "-c", "ALTER TABLE orders ADD COLUMN note text; "
              "UPDATE no_such_table SET x = 1"]
    state = maintenance_window(**scene.params(images=[f"api={GOOD_V2}"], migration_command=broken),
                               return_state=True)
    assert state.is_failed()
    logs, artifacts, run = run_record(state)
    assert scene.image() == GOOD_V1  # rolled back to the recorded image
    assert scene.app.switches() == ["on", "off"] and not scene.app.maintenance  # healthy, so open again
    [silence] = _silences(scene.am, run.name)
    assert silence["status"]["state"] == "expired"
    assert 'relation "no_such_table" does not exist' in artifacts["maintenance-migration-logs"]
    assert "note" not in scene.columns()  # psql -c ran it as one transaction: nothing half-applied here
    summary = artifacts["maintenance-summary"]
    point = f"maintenance-{run.name}"
    assert point in summary and "pitr-restore" in summary and "disaster-recovery" in summary
    assert point in state.message and "pitr-restore" in state.message
    backup_id = next(line for line in summary.splitlines() if line.startswith("- backup set:")).split("`")[1]
    assert backup_id in state.message
    _no_secrets(scene, logs, artifacts, state.message or "")


def test_update_never_healthy_and_rollback_not_healthy_keeps_maintenance_on(scene: Scene) -> None:
    from flows.maintenance import maintenance_window

    unhealthy = GOOD_V2.rsplit(":", 1)[0] + ":unhealthy"
    state = maintenance_window(**scene.params(images=[f"api={unhealthy}"], take_backup=False, restore_point=False),
                               return_state=True)
    assert state.is_failed()
    logs, artifacts, run = run_record(state)
    assert scene.image() == GOOD_V1  # the images were put back ...
    assert scene.app.maintenance and scene.app.switches() == ["on"]  # ... but the app is still broken: closed
    [silence] = _silences(scene.am, run.name)
    assert silence["status"]["state"] == "expired"  # never hide a broken app
    message = state.message or ""
    assert "putting the update back" in message and "maintenance mode stays ON" in message
    assert "MAINTENANCE MODE STAYS ON" in message and "silence expired" in message
    assert "MAINTENANCE MODE STAYS ON" in artifacts["maintenance-summary"]
    _no_secrets(scene, logs, artifacts, message)


def test_drain_timeout_with_abort_changes_nothing(scene: Scene) -> None:
    from flows.maintenance import maintenance_window
    from tasks.store import list_sets

    scene.app.drain_step = 0  # three requests that never finish
    state = maintenance_window(**scene.params(images=[f"api={GOOD_V2}"], migration_command=MIGRATE,
                                              drain_path="/active", drain_timeout_seconds=0.5), return_state=True)
    assert state.is_failed()
    logs, artifacts, run = run_record(state)
    assert "still active" in (state.message or "") and "aborted before any change" in (state.message or "")
    assert scene.app.switches() == ["on", "off"] and not scene.app.maintenance
    [silence] = _silences(scene.am, run.name)
    assert silence["status"]["state"] == "expired"
    assert not [p for _t, m, p in scene.kube.timeline if m in ("PATCH", "POST") and "/deployments/api" in p]
    assert scene.image() == GOOD_V1 and not scene.kube.jobs
    assert list_sets(scene.store.get_client()) == []
    steps = {row["step"]: row["result"] for row in _table(artifacts["maintenance-steps"])}
    assert steps["drain"].startswith("FAILED") and "backup" not in steps and "update" not in steps


def test_drain_timeout_with_proceed_goes_on(scene: Scene) -> None:
    from flows.maintenance import maintenance_window

    scene.app.drain_step = 0
    state = maintenance_window(**scene.params(drain_path="/active", drain_timeout_seconds=0.3, take_backup=False,
                                              restore_point=False, on_drain_timeout="proceed"), return_state=True)
    assert state.is_completed(), state.message
    _logs, artifacts, _run = run_record(state)
    steps = {row["step"]: row["result"] for row in _table(artifacts["maintenance-steps"])}
    assert steps["drain"].startswith("NOT drained (3 active)")
    assert scene.app.switches() == ["on", "off"]


def test_bad_input_changes_nothing(scene: Scene) -> None:
    from blocks.errors import ConfigurationError
    from flows.maintenance import maintenance_window

    for bad in [{"silence_matchers": ["env!=prod"]}, {"images": ["api"]}, {"images": ["worker=x:1"]},
                {"expected_minutes": 2000}]:
        with pytest.raises((ConfigurationError, Exception)) as info:
            maintenance_window(**scene.params(**bad))
        assert "nothing was changed" in str(info.value) or "silence" in str(info.value) or "expected" in str(
            info.value) or "image" in str(info.value) or "less than or equal" in str(info.value), str(info.value)
    assert scene.app.events == [] and scene.image() == GOOD_V1
    with scene.am.block().get_client() as client:
        assert not [s for s in client.get("/silences").json() if s["status"]["state"] == "active"
                    and s["createdBy"].startswith("runbooks/")]


# -- a fault at every changing step -------------------------------------------------------------------------------


def test_alertmanager_down_changes_nothing(scene: Scene) -> None:
    from blocks.alertmanager import AlertmanagerAPI
    from flows.maintenance import maintenance_window
    from tasks.scratch import free_port

    gone = AlertmanagerAPI(url=f"http://127.0.0.1:{free_port()}")
    state = maintenance_window(**scene.params(alertmanager=gone, images=[f"api={GOOD_V2}"]), return_state=True)
    assert state.is_failed() and "Alertmanager" in (state.message or "")
    assert scene.app.events == [] and scene.image() == GOOD_V1


def test_failed_backup_changes_nothing_and_reopens(scene: Scene) -> None:
    from flows.maintenance import maintenance_window

    state = maintenance_window(**scene.params(images=[f"api={GOOD_V2}"], migration_command=MIGRATE,
                                              backup_databases=["no_such_database"]), return_state=True)
    assert state.is_failed()
    _logs, artifacts, run = run_record(state)
    assert scene.app.switches() == ["on", "off"]
    assert not [p for _t, m, p in scene.kube.timeline if m == "PATCH"] and not scene.kube.jobs
    [silence] = _silences(scene.am, run.name)
    assert silence["status"]["state"] == "expired"
    steps = {row["step"]: row["result"] for row in _table(artifacts["maintenance-steps"])}
    assert steps["backup"].startswith("FAILED") and "update" not in steps


def test_rollout_that_never_completes_is_put_back(scene: Scene) -> None:
    from flows.maintenance import maintenance_window

    broken = GOOD_V2.rsplit(":", 1)[0] + ":broken"
    state = maintenance_window(**scene.params(images=[f"api={broken}"], migration_command=MIGRATE,
                                              take_backup=False, restore_point=False), return_state=True)
    assert state.is_failed()
    _logs, artifacts, run = run_record(state)
    assert "ProgressDeadlineExceeded" in (state.message or "")
    assert "the update was put back to the recorded version" in (state.message or "")
    assert scene.image() == GOOD_V1 and not scene.kube.jobs  # no migration against a half-rolled-out app
    assert scene.app.switches() == ["on", "off"]
    [silence] = _silences(scene.am, run.name)
    assert silence["status"]["state"] == "expired"


def test_unhealthy_update_with_a_healthy_rollback_reopens(scene: Scene) -> None:
    from flows.maintenance import maintenance_window

    scene.sticky = False
    unhealthy = GOOD_V2.rsplit(":", 1)[0] + ":unhealthy"
    state = maintenance_window(**scene.params(images=[f"api={unhealthy}"], take_backup=False, restore_point=False),
                               return_state=True)
    assert state.is_failed()
    _logs, artifacts, run = run_record(state)
    assert scene.image() == GOOD_V1 and scene.app.switches() == ["on", "off"]
    assert "maintenance mode is off again" in (state.message or "")
    [silence] = _silences(scene.am, run.name)
    assert silence["status"]["state"] == "expired"
    assert "undo: put shop/api back" in {row["step"] for row in _table(artifacts["maintenance-steps"])}


def test_drain_by_sql_waits_for_a_real_session(scene: Scene) -> None:
    import threading

    from flows.maintenance import maintenance_window

    busy = scene.pg.connect(DB, application_name="busy-worker")
    closed: list[float] = []

    def finish() -> None:
        import time

        deadline = time.monotonic() + 30
        while "on" not in scene.app.switches() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.0)  # the session is still busy for a second after maintenance went on
        closed.append(time.time())
        busy.close()

    threading.Thread(target=finish, daemon=True).start()
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'busy-worker'"
    state = maintenance_window(**scene.params(drain_query=query, take_backup=False, restore_point=False),
                               return_state=True)
    assert state.is_completed(), state.message
    _logs, artifacts, _run = run_record(state)
    steps = {row["step"]: row for row in _table(artifacts["maintenance-steps"])}
    assert steps["drain"]["result"].startswith("drained") and float(steps["drain"]["seconds"]) >= 0.5
    assert closed and scene.app.when("off") > closed[0]
