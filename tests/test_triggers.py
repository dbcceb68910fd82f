"""End to end, as an operator runs it: `runbooks up` (Prefect server + serve + bridge) with the real Debian
Prometheus, Alertmanager and Pushgateway on loopback.

The shipped BackupMissing rule fires (no backup recorded) -> Alertmanager (repeat_interval 2 s) -> the bridge
-> exactly one `backup` run, which completes and stores a verified set; the success pushed to the Pushgateway
resolves the alert, and the resolved notification follows each route's `on`. An approval route's run stays
paused with a runner polling until the form is submitted. Served deployments carry their schedules in
$RUNBOOKS_TIMEZONE. Ctrl-C stops the whole stack.

One Prefect server for the module (SQLite, as `runbooks up` makes it). With RUNBOOKS_TEST_PREFECT_DB=postgres
the server runs on a scratch PostgreSQL instead (PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.scratch import ScratchPostgres, _children, _process_alive, free_port
from tests.conftest import MonitoringDaemon, pushgateway_daemon

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
TIMEZONE = "Europe/Berlin"


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    home: Path
    api_url: str
    bridge_url: str
    token: str
    store: Path
    media: Path
    pushgateway: MonitoringDaemon

    def client(self) -> Any:
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def bridge_metric(self, name: str, **labels: str) -> float:
        text = urllib.request.urlopen(self.bridge_url + "/metrics", timeout=5).read().decode()
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def post_alert(self, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(self.bridge_url + "/alertmanager", data=json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 202
            return json.loads(response.read())


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def runs_of_route(stack: Stack, route: str) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with stack.client() as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"route:{route}"])))


def store_sets(store: Path, tag: str) -> list[Any]:
    from blocks.store import BackupStore
    from tasks.store import list_sets

    return [m for m in list_sets(BackupStore.from_url(f"file://{store}").get_client()) if tag in m.tags]


def backup_params(stack_store: Path, media: Path, tag: str) -> dict[str, Any]:
    return {"paths": [str(media)], "store": {"backend": "local", "path": str(stack_store)},
            "tags": ["alert", tag]}


@pytest.fixture(scope="module")
def prefect_database() -> Iterator[str | None]:
    """None (SQLite, the default of `runbooks up`) or a PostgreSQL URL when RUNBOOKS_TEST_PREFECT_DB=postgres."""
    if os.environ.get("RUNBOOKS_TEST_PREFECT_DB") != "postgres":
        yield None
        return
    import psycopg

    with ScratchPostgres(password=secrets.token_urlsafe(16), fast=True) as server:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE prefect")
        yield (f"postgresql+asyncpg://{server.user}:{server.password}@{server.host}:{server.port}/prefect")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, prefect_database: str | None) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("runbooks-up")
    store, media = home / "store", home / "media"
    media.mkdir()
    for i in range(20):
        (media / f"photo-{i}.bin").write_bytes(secrets.token_bytes(4096))
    token = secrets.token_urlsafe(24)
    token_file = home / "bridge-token"
    token_file.touch(mode=0o600)
    token_file.write_text(token)
    routes = {"defaults": {"cooldown": 0}, "routes": [
        {"name": "backup-missing", "alertname": "BackupMissing", "deployment": "backup/nightly", "on": "firing",
         "continue": True, "parameters": {**backup_params(store, media, "{{ labels.alertname }}"),
                                          # a saved Block, loaded by the run (what prefect.yaml does too)
                                          "store": {"$ref": {"block_document_slug": "backup-store/e2e"}}}},
        {"name": "backup-missing-resolved", "alertname": "BackupMissing", "deployment": "backup/nightly",
         "on": "resolved", "parameters": backup_params(store, media, "resolved")},
        {"name": "approve-backup", "alertname": "ApproveMe", "deployment": "backup/nightly",
         "require_approval": True, "parameters": backup_params(store, media, "approved")},
    ]}
    routes_file = home / "routes.yaml"
    routes_file.write_text(yaml.safe_dump(routes))
    port, webhook_port = free_port(), free_port()
    pushgateway = pushgateway_daemon().start()
    # The served runbooks do not push metrics here: the test pushes the success itself once it has seen
    # Alertmanager repeat the firing alert (the hooks themselves are tested in test_triggers_metrics.py).
    env = {k: v for k, v in os.environ.items() if k != "RUNBOOKS_PUSHGATEWAY_URL"}
    env["RUNBOOKS_TIMEZONE"] = TIMEZONE
    if prefect_database:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_database
    log = open(home / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "up", "--home", str(home / "state"), "--port", str(port),
         "--webhook-port", str(webhook_port), "--routes", str(routes_file), "--token-file", str(token_file),
         "--poll", "1"], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        cwd=str(home), start_new_session=True)
    log.close()
    stack = Stack(proc, home, f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{webhook_port}", token, store,
                  media, pushgateway)

    def served() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"runbooks up exited {proc.returncode}:\n{(home / 'up.log').read_text()}")
        try:
            urllib.request.urlopen(stack.bridge_url + "/healthz", timeout=2)
            with stack.client() as client:
                client.read_deployment_by_name("disaster-recovery/disaster-recovery")
        except Exception:  # noqa: BLE001 - not up yet
            return False
        return True

    try:
        wait_for("runbooks up to serve every runbook", served, timeout=180, every=1)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from blocks.store import BackupStore

        with temporary_settings({PREFECT_API_URL: stack.api_url}):
            BackupStore(path=str(store)).save("e2e", overwrite=True)
        yield stack
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pushgateway.stop()


@pytest.fixture(scope="module")
def alerting(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MonitoringDaemon, ...]]:
    """Alertmanager (from the shipped example config) and Prometheus (the shipped rules) wired to the stack."""
    work = tmp_path_factory.mktemp("alerting")
    am_config = yaml.safe_load((ROOT / "deployments/alertmanager/alertmanager.example.yml").read_text())
    am_config["route"].update(group_wait="1s", group_interval="1s", repeat_interval="2s")
    [hook] = next(r for r in am_config["receivers"] if r["name"] == "runbooks-bridge")["webhook_configs"]
    hook["url"] = stack.bridge_url + "/alertmanager"
    hook["http_config"]["authorization"]["credentials_file"] = str(stack.home / "bridge-token")
    (work / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
    alertmanager = MonitoringDaemon("prometheus-alertmanager", lambda port, d: [
        f"--config.file={work / 'alertmanager.yml'}", f"--storage.path={d}", f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address="]).start()

    rules = yaml.safe_load((ROOT / "deployments/prometheus/runbooks.rules.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        rule["for"] = "0s"  # the test cannot wait the shipped 5 minutes; the expressions are the shipped ones
    (work / "rules.yml").write_text(yaml.safe_dump(rules))
    prometheus_config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(work / "rules.yml")],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{alertmanager.port}"]}]}]},
        "scrape_configs": [{"job_name": "pushgateway", "honor_labels": True,
                            "static_configs": [{"targets": [f"127.0.0.1:{stack.pushgateway.port}"]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config))
    prometheus = MonitoringDaemon("prometheus", lambda port, d: [
        f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={d}/data",
        f"--web.listen-address=127.0.0.1:{port}", "--rules.alert.resend-delay=2s"]).start()
    try:
        yield alertmanager, prometheus
    finally:
        prometheus.stop()
        alertmanager.stop()


def test_served_deployments_have_their_schedules(stack: Stack) -> None:
    with stack.client() as client:
        nightly = client.read_deployment_by_name("backup/nightly")
        retention = client.read_deployment_by_name("apply-retention/daily")
        verify = client.read_deployment_by_name("verify-backup/after-nightly")
        recovery = client.read_deployment_by_name("disaster-recovery/disaster-recovery")
    [schedule] = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == TIMEZONE and schedule.active
    assert verify.schedules[0].schedule.cron == "0 4 * * *"
    [cleanup] = retention.schedules
    assert cleanup.parameters == {"dry_run": False}  # a click plans; only the schedule deletes
    assert recovery.schedules == [] and "destructive" in recovery.tags
    assert set(nightly.tags) >= {"runbooks", "backup"}


def test_the_scheduler_creates_the_nightly_runs(stack: Stack) -> None:
    """A schedule is only as good as the runs it produces: the server's scheduler service must create them
    (with SQLAlchemy 2.1, Prefect 3.8.8's scheduler failed on every loop and no cron run was ever created)."""
    from zoneinfo import ZoneInfo

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    def scheduled() -> list[Any]:
        with stack.client() as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly"])), limit=50)
        return [run for run in runs if run.auto_scheduled]  # not the runs the alerts start

    runs = wait_for("the scheduler to create the nightly backup's runs", scheduled, timeout=120, every=2)
    for run in runs:
        local = run.expected_start_time.astimezone(ZoneInfo(TIMEZONE))
        assert (local.hour, local.minute) == (2, 0) and run.state.is_scheduled(), (local, run.state)
    server_log = (stack.home / "state" / "prefect-server.log").read_text().splitlines()
    assert not [line for line in server_log if "ERROR" in line and "schedule" in line]


def test_alert_fires_one_run_that_completes_and_resolution_follows_on(stack: Stack,
                                                                     alerting: tuple[MonitoringDaemon, ...]) -> None:
    from flows.backup import backup
    from tasks.files import tree_digest
    from tasks.metrics import push_flow_run_metrics

    [run] = wait_for("BackupMissing to start a backup run", lambda: runs_of_route(stack, "backup-missing"), 90)

    def finished() -> Any:
        with stack.client() as client:
            state = client.read_flow_run(run.id).state
        assert not (state.is_failed() or state.is_crashed()), state
        return state.is_completed()

    wait_for("the alert's backup run to complete", finished, 120)
    [manifest] = store_sets(stack.store, "BackupMissing")
    [part] = manifest.parts
    assert part.kind == "files" and part.files.digest == tree_digest(str(stack.media)).digest

    # Alertmanager keeps repeating the firing notification every 2 s: still exactly one run.
    firing = stack.bridge_metric("runbooks_bridge_alerts_received_total", status="firing")
    wait_for("three more repeats", lambda: stack.bridge_metric(
        "runbooks_bridge_alerts_received_total", status="firing") >= firing + 3, 60)
    assert len(runs_of_route(stack, "backup-missing")) == 1
    assert stack.bridge_metric("runbooks_bridge_alerts_deduplicated_total") >= 3

    # What the flow's on_completion hook does: push the success; BackupMissing resolves.
    with stack.client() as client:
        flow_run = client.read_flow_run(run.id)
    os.environ["RUNBOOKS_PUSHGATEWAY_URL"] = stack.pushgateway.url
    try:
        push_flow_run_metrics(backup, flow_run, flow_run.state)
    finally:
        del os.environ["RUNBOOKS_PUSHGATEWAY_URL"]
    [resolved_run] = wait_for("the resolved notification's run",
                              lambda: runs_of_route(stack, "backup-missing-resolved"), 90)
    assert stack.bridge_metric("runbooks_bridge_alerts_skipped_total", reason="status") >= 2
    assert stack.bridge_metric("runbooks_bridge_alerts_received_total", status="resolved") >= 1
    assert len(runs_of_route(stack, "backup-missing")) == 1
    time.sleep(3)  # repeats of the resolved notification start nothing either
    assert [r.id for r in runs_of_route(stack, "backup-missing-resolved")] == [resolved_run.id]


def test_approval_route_waits_for_the_form_with_a_runner_polling(stack: Stack) -> None:
    from prefect.client.schemas.responses import SetStateStatus

    body = {"version": "4", "groupKey": "g", "status": "firing", "receiver": "runbooks-bridge",
            "alerts": [{"status": "firing", "labels": {"alertname": "ApproveMe"}, "annotations": {},
                        "startsAt": "2026-11-22T00:00:00Z", "fingerprint": secrets.token_hex(8)}]}
    answer = stack.post_alert(body)
    assert [c["awaiting_approval"] for c in answer["created"] + answer["pending"]] == [True]
    [run] = wait_for("the approval run", lambda: runs_of_route(stack, "approve-backup"), 30)
    created = {"flow_run_id": str(run.id)}
    time.sleep(5)  # five runner polls
    with stack.client() as client:
        assert client.read_flow_run(created["flow_run_id"]).state.is_paused()
        assert store_sets(stack.store, "approved") == []
        result = client.resume_flow_run(created["flow_run_id"], run_input={
            "decision": "approve", "confirm_target": "backup/nightly", "approved_by": "e2e"})
        assert result.status == SetStateStatus.ACCEPT

    def completed() -> bool:
        with stack.client() as client:
            state = client.read_flow_run(created["flow_run_id"]).state
        assert not (state.is_failed() or state.is_crashed()), state
        return state.is_completed()

    wait_for("the approved run to complete", completed, 120)
    assert len(store_sets(stack.store, "approved")) == 1


def test_a_rejected_alert_approval_ends_cancelled_and_changes_nothing(stack: Stack) -> None:
    """The bridge's form answered reject: the run is resumed (Prefect cannot refuse it otherwise), and the flow
    ends Cancelled before doing anything."""
    before = {r.id for r in runs_of_route(stack, "approve-backup")}
    sets_before = len(store_sets(stack.store, "approved"))
    body = {"version": "4", "groupKey": "g", "status": "firing", "receiver": "runbooks-bridge",
            "alerts": [{"status": "firing", "labels": {"alertname": "ApproveMe"}, "annotations": {},
                        "startsAt": "2026-11-22T00:00:00Z", "fingerprint": secrets.token_hex(8)}]}
    stack.post_alert(body)
    [run] = wait_for("the new approval run",
                     lambda: [r for r in runs_of_route(stack, "approve-backup") if r.id not in before], 30)
    with stack.client() as client:
        result = client.resume_flow_run(run.id, run_input={"decision": "reject", "note": "not now"})
    assert result.status.value == "ACCEPT"

    def ended() -> Any:
        with stack.client() as client:
            state = client.read_flow_run(run.id).state
        return state if state.is_final() else None

    state = wait_for("the rejected run to end", ended, 120)
    assert state.is_cancelled() and "nothing was changed" in (state.message or ""), state
    assert len(store_sets(stack.store, "approved")) == sets_before


def nice_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # field 19 of proc(5), counted after the command name


def test_up_runs_the_server_serve_and_bridge_at_its_own_priority_by_default(stack: Stack) -> None:
    def cmdline(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")

    children = {pid: cmdline(pid) for pid in _children(stack.proc.pid)}
    [server] = [pid for pid, cmd in children.items() if "prefect server start" in cmd]
    [bridge] = [pid for pid, cmd in children.items() if "deployments.cli webhook" in cmd]
    [serve] = [pid for pid, cmd in children.items() if "deployments.cli serve" in cmd]
    assert nice_of(server) == nice_of(bridge) == nice_of(serve) == nice_of(stack.proc.pid)


def test_server_nice_lowers_the_priority_of_the_prefect_server_only(tmp_path: Path) -> None:
    """`runbooks up --server-nice N`: the server's child starts N nicer, the others as up itself."""
    from deployments import serve

    args = serve.build_parser("up").parse_args(["--server-nice", "5"])
    assert args.server_nice == 5 and serve.build_parser("up").parse_args([]).server_nice == 0
    children = serve.ChildProcesses(tmp_path)
    try:
        server = children.start("prefect-server", ["sleep", "30"], os.environ, nice=args.server_nice)
        bridge = children.start("webhook", ["sleep", "30"], os.environ)
        assert nice_of(server.pid) == nice_of(os.getpid()) + 5
        assert nice_of(bridge.pid) == nice_of(os.getpid())
    finally:
        children.stop()


def test_served_runs_start_from_a_forkserver(stack: Stack) -> None:
    """`runbooks serve` starts runs as forks of a helper that imported Prefect and the runbooks once
    (deployments/forkserver.py); tests/test_forkserver.py checks a run's lineage, this that up uses it."""
    def cmdline(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")

    [serve] = [pid for pid in _children(stack.proc.pid) if "deployments.cli serve" in cmdline(pid)]
    assert "--start-method forkserver" in cmdline(serve)
    assert [pid for pid in _children(serve) if "multiprocessing.forkserver" in cmdline(pid)]


def shipped_parameters(deployment: str) -> dict[str, Any]:
    """A deployment's default parameters as prefect.yaml ships them (YAML anchors resolved)."""
    [entry] = [d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"] if d["name"] == deployment]
    return dict(entry.get("parameters") or {})


def test_the_shipped_nightly_backup_and_its_drill_pass_with_their_defaults(stack: Stack, fresh_pg: Any,
                                                                           scratch_redis: Any) -> None:
    """`backup/nightly` then `verify-backup/after-nightly` with exactly the parameters prefect.yaml gives them: the
    Blocks those name point at a server with `postgres` and an application database, and a Redis. (`runbooks up`
    leaves out references to Blocks not saved when it started, so the run passes prefect.yaml's own.)"""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from blocks.postgres import PostgresConnection
    from blocks.redis import RedisConnection
    from blocks.store import BackupStore
    from tasks.store import list_sets, read_verification

    pg = PostgresConnection.from_url(fresh_pg.url)
    with pg.connect(autocommit=True) as conn:
        conn.execute("CREATE DATABASE shop")
        conn.execute("CREATE TABLE notes AS SELECT g AS id FROM generate_series(1, 100) g")
    with pg.connect("shop", autocommit=True) as conn:
        conn.execute("CREATE TABLE orders AS SELECT g AS id, md5(g::text) AS ref FROM generate_series(1, 1000) g")
    RedisConnection.from_url(scratch_redis.url).get_client().set("session:1", "user")
    store = BackupStore(path=str(stack.home / "nightly-store"))
    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        store.save("backups", overwrite=True)
        pg.save("app-db", overwrite=True)
        RedisConnection.from_url(scratch_redis.url).save("app-redis", overwrite=True)
        backup_run = run_deployment("backup/nightly", parameters=shipped_parameters("nightly"), timeout=300,
                                    poll_interval=1)
        assert backup_run.state.is_completed(), backup_run.state
        drill_run = run_deployment("verify-backup/after-nightly", parameters=shipped_parameters("after-nightly"),
                                   timeout=300, poll_interval=1)
        assert drill_run.state.is_completed(), drill_run.state
    [manifest] = list_sets(store.get_client())
    assert {(p.kind, p.name) for p in manifest.parts} >= {("postgres", "postgres"), ("postgres", "shop"),
                                                          ("globals", "globals"), ("redis", "redis")}
    record = read_verification(store.get_client(), manifest.set_id)
    assert record is not None and record.ok and record.problems == []

    # The shipped disaster-recovery deployment, with prefect.yaml's parameters plus the targets an operator
    # picks in the form (the same saved Blocks) and confirm: every database, postgres included, and Redis back.
    from tasks.pg_checksums import collect_checksums
    from tasks.redis import keyspace_digest

    redis = RedisConnection.from_url(scratch_redis.url)

    def fingerprint() -> tuple:
        with pg.connect("shop") as conn:
            shop = collect_checksums(conn)
        with pg.connect() as conn:
            notes = collect_checksums(conn)
        return shop, notes, keyspace_digest(redis)

    good = fingerprint()
    with pg.connect("shop", autocommit=True) as conn:
        conn.execute("DELETE FROM orders WHERE id % 2 = 0")
    with pg.connect(autocommit=True) as conn:
        conn.execute("DROP TABLE notes")
    redis.get_client().flushall()
    assert fingerprint() != good
    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        recovery_run = run_deployment(
            "disaster-recovery/disaster-recovery", timeout=300, poll_interval=1,
            parameters={**shipped_parameters("disaster-recovery"), "confirm": True,
                        "postgres": {"$ref": {"block_document_slug": "postgres-connection/app-db"}},
                        "redis": {"$ref": {"block_document_slug": "redis-connection/app-redis"}}})
        assert recovery_run.state.is_completed(), recovery_run.state
    assert fingerprint() == good


def test_ctrl_c_stops_the_whole_stack(stack: Stack) -> None:
    descendants = _descendants(stack.proc.pid)
    assert len(descendants) >= 3  # server, serve, webhook (and their own children)
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(90) == 0
    wait_for("every child to exit", lambda: not [p for p in descendants if _process_alive(p)], 30)
    serve_log = (stack.home / "state" / "serve.log").read_text()
    assert "never awaited" not in serve_log, serve_log[-3000:]  # the runner awaits its astop() on SIGTERM


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found
