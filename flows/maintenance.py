"""The `maintenance-window` runbook: silence, maintenance on, drain, backup + restore point, update, migrate,
prove health, maintenance off, expire the silence; and on any failure leave the service up or safely closed.

Order (each a task or subflow with its own state in the UI, each timed in the summary):
  silence -> maintenance on -> drain -> backup (subflow) + restore point -> update + wait for the rollout ->
  migration (Kubernetes Job from the new image, or a command over SSH; logs kept) -> health (+ Prometheus
  checks) -> maintenance off -> expire the silence -> summary artifact and notification.

Compensation: each changing step registers its undo before it runs (tasks/undo.py). On a failure the undos
run newest first: the update is put back to the recorded pod templates (or env file), then health is checked
and maintenance goes off only when the app is healthy, then the silence is expired whatever happened (a
broken app is never hidden). A failed migration is not undone: the report names the restore point and the
backup set and the runbooks that go back to them (`pitr-restore`, `disaster-recovery`). A run that dies
mid-window leaves a silence that ends by itself (window end + margin).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.concurrency.sync import concurrency
from pydantic import BaseModel, Field

from blocks.alertmanager import AlertmanagerAPI
from blocks.app import AppEndpoint
from blocks.errors import ConfigurationError, RunbookError
from blocks.kubernetes import KubernetesCluster
from blocks.postgres import PostgresConnection
from blocks.prometheus import PrometheusAPI
from blocks.redis import RedisConnection
from blocks.ssh import SSHHost
from blocks.store import BackupStore
from flows._form import DANGER, param
from flows.backup import backup
from tasks.alertmanager import Silence, create_silence, expire_silence, matchers_of, silence_end
from tasks.app import set_maintenance, wait_until_healthy
from tasks.approval import refused_at_start
from tasks.compose import ComposeProject, check_variables, env_values, pull_and_up, set_env_lines, wait_compose_healthy
from tasks.drain import DrainTimeout, wait_until_drained
from tasks.housekeeping import (
    HousekeepingResult,
    Step,
    apt_upgrade,
    check_certificates,
    check_disk_usage,
    prune_containers,
    rotate_logs,
)
from tasks.kubernetes import (
    DeploymentState,
    apply_pod_template,
    parse_images,
    record_deployments,
    set_images,
    wait_for_rollout,
)
from tasks.kubernetes_jobs import MigrationFailed, job_logs, job_name, migration_job_body, start_job, wait_for_job
from tasks.locks import ensure_lock, lock_name
from tasks.log import run_logger
from tasks.metrics import push_flow_run_metrics
from tasks.notify import notify_hook
from tasks.pitr.restore_points import create_restore_point
from tasks.prometheus import CheckResult, MetricCheck, MetricCheckFailed, check_metric
from tasks.ssh import read_remote_file, run_remote, write_remote_file
from tasks.undo import UndoStack

Target = Literal["kubernetes", "compose-ssh", "none"]
WINDOW_BY = "runbooks.prefect.io/maintenance-window"
MAX_LOG_CHARS = 60_000  # per pod/command in the artifact: the end explains a failure


class WindowFailed(RunbookError):
    """The window failed; the message says what was put back, whether maintenance mode is still on, whether the
    silence is expired, and (after a failed migration) the restore point and backup set to go back to."""


class HousekeepingFailed(RunbookError):
    """A housekeeping command could not run (non-zero exit); its output is in the housekeeping artifact."""


class MaintenanceResult(BaseModel):
    outcome: str
    silence_id: str | None = None
    backup_set_id: str | None = None
    restore_point: str | None = None
    restore_point_lsn: str | None = None
    images_before: dict[str, str] = Field(default_factory=dict)
    images_after: dict[str, str] = Field(default_factory=dict)
    steps: list[dict[str, Any]] = Field(default_factory=list)


# -- the window's record ----------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    step: str
    started: datetime
    seconds: float = 0.0
    result: str = "running"


@dataclass
class Window:
    """Everything the summary reports; filled in as the steps run."""

    run_name: str
    steps: list[StepRecord] = field(default_factory=list)
    silence: Silence | None = None
    silence_expired: bool = False
    maintenance_on: bool = False
    backup_set_id: str | None = None
    backup_store: str | None = None
    restore_point: str | None = None
    restore_point_lsn: str | None = None
    before: dict[str, str] = field(default_factory=dict)  # what -> image or version
    after: dict[str, str] = field(default_factory=dict)
    migration: str = "not run"
    migration_failed: bool = False
    checks: list[CheckResult] = field(default_factory=list)
    housekeeping: list[HousekeepingResult] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    @contextmanager
    def step(self, name: str) -> Iterator[StepRecord]:
        record = StepRecord(name, datetime.now(UTC))
        self.steps.append(record)
        started = time.monotonic()
        try:
            yield record
        except BaseException as exc:
            record.result = f"FAILED: {exc}"
            raise
        else:
            if record.result == "running":
                record.result = "ok"
        finally:
            record.seconds = round(time.monotonic() - started, 2)

    def skip(self, name: str, why: str) -> None:
        self.steps.append(StepRecord(name, datetime.now(UTC), 0.0, f"skipped: {why}"))


@dataclass(frozen=True)
class _Health:
    app: AppEndpoint | None
    prometheus: PrometheusAPI | None
    checks: list[MetricCheck]
    timeout: float
    poll: float
    check_interval: float


def _prove_healthy(health: _Health, window: Window, left_as: str) -> None:
    """The app's health endpoint, then every Prometheus check; any failure raises."""
    if health.app is not None:
        wait_until_healthy(health.app, timeout_seconds=health.timeout, interval_seconds=min(health.poll, 2),
                           left_as=left_as)
    for check in health.checks:
        assert health.prometheus is not None
        result = check_metric(health.prometheus, check, interval_seconds=health.check_interval)
        window.checks.append(result)
        if not result.passed:
            raise MetricCheckFailed(f"check {result.name!r} failed: {result.detail}; measured "
                                    f"{[round(v, 6) for v in result.values]} (max {result.max:g}); {left_as}")


# -- the flow ---------------------------------------------------------------------------------------------------


@flow(name="maintenance-window", on_completion=[notify_hook("completed"), push_flow_run_metrics],
      on_failure=[notify_hook("FAILED"), push_flow_run_metrics],
      on_crashed=[notify_hook("CRASHED"), push_flow_run_metrics],
      on_cancellation=[notify_hook("cancelled")])
def maintenance_window(
    reason: Annotated[str, param(
        "Reason", "Why: shown in the silence, the report and the notice. Required.", min_length=1)],
    target: Annotated[Target, param(
        "What to update", "kubernetes (default): Deployments; compose-ssh: a compose service over SSH; none: "
        "no update (migration, backup or housekeeping only).")] = "kubernetes",
    images: Annotated[list[str] | None, param(
        "New images", "kubernetes: the update, CONTAINER=IMAGE, e.g. api=registry/app:v2.0.0. Empty: no "
        "image update.")] = None,
    deployments: Annotated[list[str] | None, param(
        "Deployments", "kubernetes: Deployment names to update. Empty: use the selector.")] = None,
    selector: Annotated[str, param(
        "Label selector", "kubernetes: or a label selector of the Deployments, e.g. app=shop. Empty: "
        "none.")] = "",
    namespace: Annotated[str, param(
        "Namespace", "Empty (default): the cluster Block's namespace.")] = "",
    migration_command: Annotated[list[str] | None, param(
        "Migration command", "argv, e.g. [alembic, upgrade, head]. kubernetes: a Job from the new image; "
        "otherwise run over SSH. Empty: no migration.")] = None,
    expected_minutes: Annotated[float, param(
        "Expected duration (min)", "How long the window should take; the silence and the notice use it. 30 "
        "by default.", gt=0, le=1440)] = 30,
    take_backup: Annotated[bool, param(
        "Back up first", "Run the backup runbook before any change. On by default; off: no backup to go "
        "back to.")] = True,
    cluster: Annotated[KubernetesCluster | None, param(
        "Kubernetes cluster", "kubernetes: the cluster. Empty: required for target kubernetes.")] = None,
    app: Annotated[AppEndpoint | None, param(
        "Application", "Maintenance switch and health of the app. Empty: no maintenance mode and no health "
        "check.")] = None,
    alertmanager: Annotated[AlertmanagerAPI | None, param(
        "Alertmanager", "Silences the window's alerts (the silence always ends). Empty: no silence.")] = None,
    silence_matchers: Annotated[list[str] | None, param(
        "Silence matchers", 'e.g. [service="shop"]: the alerts the window causes. Empty: no silence.')] = None,
    silence_margin_minutes: Annotated[float, param(
        "Silence margin (min)", "The silence ends this long after the expected end (it always ends). 15 by "
        "default.", ge=0)] = 15,
    store: Annotated[BackupStore | None, param(
        "Backup store", "Where the backup goes. Empty: the backup runbook's default store.")] = None,
    postgres: Annotated[PostgresConnection | None, param(
        "PostgreSQL server", "Backed up; gets the restore point; runs the drain query. Empty: none of "
        "these.")] = None,
    backup_databases: Annotated[list[str] | None, param(
        "Backup: databases", "Databases the backup dumps. Empty: every database.")] = None,
    redis: Annotated[RedisConnection | None, param(
        "Redis server", "Included in the backup. Empty: no Redis in the backup.")] = None,
    backup_paths: Annotated[list[str] | None, param(
        "Backup: directories", "Directories the backup archives. Empty: none.")] = None,
    restore_point: Annotated[bool, param(
        "Restore point", "pg_create_restore_point('maintenance-<run>') before the update, for a "
        "point-in-time restore. On by default.")] = True,
    drain_path: Annotated[str, param(
        "Drain: HTTP path", "GET on the app answering the active-work count, waited for to reach 0. Empty: "
        "no HTTP drain.")] = "",
    drain_field: Annotated[str, param(
        "Drain: JSON field", "Field of that JSON answer holding the count. active by default.")] = "active",
    drain_query: Annotated[str, param(
        "Drain: SQL query", "Or a read-only SQL query returning the count. Empty: none.")] = "",
    drain_timeout_seconds: Annotated[float, param(
        "Drain timeout (s)", "How long to wait for the work to drain. 300 by default.", gt=0)] = 300,
    drain_poll_seconds: Annotated[float, param(
        "Drain poll (s)", "Seconds between drain checks. 2 by default.", gt=0)] = 2,
    on_drain_timeout: Annotated[Literal["abort", "proceed"], param(
        "When draining times out", "abort (default): reopen and end without change. proceed: update with "
        "work still active.")] = "abort",
    ssh: Annotated[SSHHost | None, param(
        "SSH host", "compose-ssh: the host; also where an SSH migration and housekeeping run. Empty: no "
        "SSH.")] = None,
    compose_dir: Annotated[str, param(
        "Compose directory", "compose-ssh: the project directory on the host.")] = "",
    compose_project: Annotated[str, param(
        "Compose project", "compose-ssh: the project name (-p). app by default.")] = "app",
    compose_env_file: Annotated[str, param(
        "Compose env file", "compose-ssh: the env file, relative to the directory. .env by default.")] = ".env",
    compose_service: Annotated[str, param(
        "Compose service", "compose-ssh: the service to recreate.")] = "",
    variables: Annotated[dict[str, str] | None, param(
        "Version variables", "compose-ssh: the update as version variables in the env file, e.g. "
        "{API_VERSION: v2}.")] = None,
    migration_container: Annotated[str, param(
        "Migration container", "kubernetes: the container of the Deployment's pod template the Job copies. "
        "Empty (default): the first.")] = "",
    migration_timeout_seconds: Annotated[float, param(
        "Migration timeout (s)", "How long the migration may run before the update is put back. 1800 by "
        "default.", gt=0)] = 1800,
    prometheus: Annotated[PrometheusAPI | None, param(
        "Prometheus", "Evaluates the checks below after the update. Empty: no metric checks.")] = None,
    checks: Annotated[list[MetricCheck] | None, param(
        "Metric checks", "Each must hold after the update, else it is put back. Empty: none.")] = None,
    housekeeping: Annotated[list[Step] | None, param(
        "Housekeeping steps", "Opt-in steps over SSH (the ssh Block), run after the backup, before the "
        "update. Empty: none.")] = None,
    apt_real_upgrade: Annotated[bool, param(
        DANGER + "real apt upgrade", "apt-upgrade step: really upgrade packages. Off by default: "
        "simulated.")] = False,
    certificates: Annotated[list[str] | None, param(
        "Certificates", "certificate-expiry step: PEM paths on the host.")] = None,
    certificate_min_days: Annotated[float, param(
        "Certificate minimum days", "certificate-expiry: a finding below this many days left. 14 by "
        "default.", ge=0)] = 14,
    disk_paths: Annotated[list[str] | None, param(
        "Disk paths", "disk-usage step: paths on the host. Empty: /.")] = None,
    disk_max_percent: Annotated[float, param(
        "Disk maximum (%)", "disk-usage: a finding above this use. 85 by default.", gt=0, le=100)] = 85,
    logrotate_config: Annotated[str, param(
        "logrotate config", "logrotate step: the configuration file. /etc/logrotate.conf by default.")
    ] = "/etc/logrotate.conf",
    logrotate_state: Annotated[str, param(
        "logrotate state file", "logrotate -s STATE. Empty (default): logrotate's own.")] = "",
    logrotate_force: Annotated[bool, param(
        "logrotate --force", "Rotate even when not due. Off by default.")] = False,
    rollout_timeout_seconds: Annotated[float, param(
        "Rollout timeout (s)", "How long the rollout may take before the update is put back. 600 by "
        "default.", gt=0)] = 600,
    poll_seconds: Annotated[float, param(
        "Poll interval (s)", "Seconds between rollout status checks. 2 by default.", gt=0)] = 2,
    health_timeout_seconds: Annotated[float, param(
        "Health timeout (s)", "How long the app may take to be healthy after the update. 120 by default.",
        gt=0)] = 120,
    check_interval_seconds: Annotated[float, param(
        "Check interval (s)", "Seconds between metric check evaluations. 5 by default.", gt=0)] = 5,
    lock_timeout_seconds: Annotated[float, param(
        "Lock wait (s)", "Wait this long for another window on the same target, then fail. 600 by default.",
        ge=0)] = 600,
    notify_block: Annotated[str | None, param(
        "Notify", "A saved notification Block (e.g. slack-webhook/ops) told of the outcome. Empty: nobody is "
        "told.")] = None,
) -> MaintenanceResult:
    """One maintenance window, compensated: the service ends fully updated or as before, or stays closed
    (maintenance on) and the run fails loudly."""
    if (refused := refused_at_start()) is not None:  # an alert's approval form said reject
        return refused
    log = run_logger()
    # -- everything that can be checked before any change ------------------------------------------------------
    if not reason.strip():
        raise ConfigurationError("give a reason; nothing was changed")
    if alertmanager is not None:
        matchers_of(silence_matchers or [])
        silence_end(datetime.now(UTC), expected_minutes, silence_margin_minutes)
    elif silence_matchers:
        raise ConfigurationError("silence_matchers need the alertmanager Block; nothing was changed")
    if (drain_path or drain_query) and (drain_path and drain_query):
        raise ConfigurationError("drain by drain_path or drain_query, not both; nothing was changed")
    if drain_path and app is None:
        raise ConfigurationError("drain_path needs the app Block; nothing was changed")
    if drain_query and postgres is None:
        raise ConfigurationError("drain_query needs the postgres Block; nothing was changed")
    if take_backup and postgres is None and redis is None and not backup_paths:
        raise ConfigurationError("take_backup needs postgres, redis or backup_paths (or take_backup=false); "
                                 "nothing was changed")
    if restore_point and postgres is None:
        raise ConfigurationError("restore_point needs the postgres Block (or restore_point=false); nothing was "
                                 "changed")
    if checks and prometheus is None:
        raise ConfigurationError("checks need the prometheus Block; nothing was changed")
    if housekeeping and ssh is None:
        raise ConfigurationError("housekeeping steps run over SSH: give the ssh Block; nothing was changed")
    if housekeeping and "certificate-expiry" in housekeeping and not certificates:
        raise ConfigurationError("certificate-expiry needs certificates (paths on the host); nothing was changed")
    wanted = parse_images(images) if images else None
    health = _Health(app, prometheus, checks or [], health_timeout_seconds, poll_seconds, check_interval_seconds)
    window = Window(run_name=_run_name())

    before: list[DeploymentState] = []
    project: ComposeProject | None = None
    original_env: str | None = None
    ns = ""
    if target == "kubernetes":
        if cluster is None or (not deployments and not selector):
            raise ConfigurationError("target kubernetes needs the cluster Block and deployments or a selector; "
                                     "nothing was changed")
        ns = namespace or cluster.namespace
        before = record_deployments(cluster, ns, deployments or None, selector or None)
        known = {c for s in before for c in s.images}
        if wanted is not None and set(wanted) - known:
            raise ConfigurationError(f"no container named {sorted(set(wanted) - known)} in "
                                     f"{[s.target for s in before]} (containers: {sorted(known)}); nothing was changed")
        if migration_command and migration_container and migration_container not in before[0].images:
            raise ConfigurationError(f"{before[0].target} has no container {migration_container!r}; nothing was "
                                     "changed")
        window.before = {f"{s.target}/{c}": i for s in before for c, i in s.images.items()}
        lock_target = f"{cluster.describe()}/{'+'.join(s.name for s in before)}"
    elif target == "compose-ssh":
        if ssh is None or not compose_dir or not compose_service:
            raise ConfigurationError("compose-ssh needs the ssh Block, compose_dir and compose_service; nothing "
                                     "was changed")
        if variables:
            check_variables(variables)
        project = ComposeProject(compose_dir, compose_project, compose_env_file)
        original_env = read_remote_file(ssh, project.env_path)
        if variables and original_env is None:
            raise ConfigurationError(f"{ssh.describe()}: {project.env_path} does not exist; nothing was changed")
        window.before = {k: str(v) for k, v in env_values(original_env or "", list(variables or {})).items()}
        lock_target = f"{ssh.host}:{ssh.port}/{compose_dir}/{compose_project}"
    else:
        if wanted or variables:
            raise ConfigurationError("target none takes no update (images/variables); nothing was changed")
        lock_target = app.describe() if app is not None else "none"
    if migration_command and target != "kubernetes" and ssh is None:
        raise ConfigurationError("a migration outside Kubernetes runs over SSH: give the ssh Block; nothing was "
                                 "changed")

    undo = UndoStack()
    failure: BaseException | None = None
    lock = lock_name("maintenance-window", lock_target)
    ensure_lock(lock)
    with ExitStack() as stack:
        stack.enter_context(concurrency(lock, occupy=1, timeout_seconds=lock_timeout_seconds, strict=True))
        try:
            with undo:
                # 1. silence: its expiry is the last undo, and always runs on failure
                if alertmanager is not None:
                    with window.step("silence"):
                        undo.register("expire the silence", _undo_step(window, "undo: expire the silence",
                                                                       lambda: _expire(alertmanager, window)))
                        ends = silence_end(datetime.now(UTC), expected_minutes, silence_margin_minutes)
                        window.silence = create_silence(
                            alertmanager, silence_matchers or [], ends, created_by=f"runbooks/{window.run_name}",
                            comment=f"maintenance-window {window.run_name}: {reason}")
                else:
                    window.skip("silence", "no alertmanager Block")
                # 2. maintenance on: off again only once the app is healthy
                if app is not None:
                    with window.step("maintenance on"):
                        undo.register("check health, then maintenance off (stays ON if unhealthy)",
                                      _undo_step(window, "undo: health, then maintenance off",
                                                 lambda: _off_when_healthy(app, health, window)))
                        set_maintenance(app, True)
                        window.maintenance_on = True
                else:
                    window.skip("maintenance on", "no app Block")
                # 3. drain
                if drain_path or drain_query:
                    with window.step("drain") as record:
                        drained = wait_until_drained(app=app if drain_path else None, path=drain_path,
                                                     field=drain_field, postgres=postgres if drain_query else None,
                                                     query=drain_query, timeout_seconds=drain_timeout_seconds,
                                                     interval_seconds=drain_poll_seconds)
                        if not drained.drained:
                            if on_drain_timeout == "abort":
                                raise DrainTimeout(f"{drained.last_count} still active at {drained.source} after "
                                                   f"{drain_timeout_seconds:.0f} s; aborted before any change")
                            record.result = f"NOT drained ({drained.last_count} active): proceeding as chosen"
                            log.warning("proceeding with %d still active (on_drain_timeout=proceed)",
                                        drained.last_count)
                        else:
                            record.result = f"drained ({drained.polls} polls)"
                else:
                    window.skip("drain", "no drain_path or drain_query")
                # 4. backup + restore point (no undo: they change nothing in production)
                if take_backup:
                    with window.step("backup") as record:
                        result = backup(store=store, postgres=postgres, databases=backup_databases, redis=redis,
                                        paths=backup_paths, tags=["maintenance-window", window.run_name])
                        window.backup_set_id, window.backup_store = result.set_id, result.store
                        record.result = f"set {result.set_id} ({result.parts} parts)"
                else:
                    window.skip("backup", "take_backup=false")
                if restore_point:
                    assert postgres is not None
                    with window.step("restore point") as record:
                        name = f"maintenance-{window.run_name}"[:63]
                        point = create_restore_point(postgres, name, store)
                        window.restore_point, window.restore_point_lsn = point.name, point.lsn
                        record.result = f"{point.name} at {point.lsn}"
                else:
                    window.skip("restore point", "restore_point=false")
                # 4b. housekeeping: a step that cannot run stops the window before the update
                for name in housekeeping or []:
                    assert ssh is not None
                    with window.step(f"housekeeping: {name}") as record:
                        done = _housekeep(name, ssh, apt_real_upgrade, certificates or [], certificate_min_days,
                                          disk_paths or ["/"], disk_max_percent, logrotate_config, logrotate_state,
                                          logrotate_force)
                        window.housekeeping.append(done)
                        record.result = ("ok: " if not done.finding else "FINDING: ") + done.summary + (
                            f" ({done.finding})" if done.finding else "")
                        if done.finding:
                            window.findings.append(f"{name}: {done.finding}")
                        if not done.ok:
                            raise HousekeepingFailed(f"housekeeping step {name} failed: {done.summary}")
                # 5. the update, each change's undo registered first
                if target == "kubernetes" and wanted is not None:
                    assert cluster is not None
                    with window.step("update") as record:
                        for state in before:
                            mine = {c: i for c, i in wanted.items() if c in state.images}
                            if not mine:
                                continue
                            undo.register(f"put {state.target} back to {state.image_list()}",
                                          _undo_step(window, f"undo: put {state.target} back",
                                                     _restore_deployment(cluster, state, rollout_timeout_seconds,
                                                                         poll_seconds)))
                            set_images(cluster, ns, state.name, mine, annotations={WINDOW_BY: window.run_name})
                        for state in before:
                            wait_for_rollout(cluster, ns, state.name, timeout_seconds=rollout_timeout_seconds,
                                             interval_seconds=poll_seconds)
                        record.result = ", ".join(f"{c}={i}" for c, i in wanted.items())
                elif target == "compose-ssh" and variables:
                    assert ssh is not None and project is not None and original_env is not None
                    with window.step("update") as record:
                        undo.register(f"put {project.env_path} back and recreate {compose_service}",
                                      _undo_step(window, f"undo: put {compose_service} back",
                                                 _restore_compose(ssh, project, compose_service, original_env,
                                                                  rollout_timeout_seconds, poll_seconds)))
                        write_remote_file(ssh, project.env_path, set_env_lines(original_env, variables))
                        pull_and_up(ssh, project, [compose_service])
                        wait_compose_healthy(ssh, project, [compose_service], timeout_seconds=rollout_timeout_seconds,
                                             interval_seconds=poll_seconds)
                        record.result = ", ".join(f"{k}={v}" for k, v in variables.items())
                else:
                    window.skip("update", "no images/variables given")
                # 6. the migration: not undone; the restore point and backup set are the way back
                if migration_command:
                    with window.step("migration") as record:
                        record.result = _migrate(window, target, cluster, ns, before, wanted, migration_container,
                                                 migration_command, migration_timeout_seconds, poll_seconds, ssh,
                                                 compose_dir)
                else:
                    window.skip("migration", "no migration_command")
                # 7. health
                with window.step("health"):
                    _prove_healthy(health, window, "putting the update back")
            # 8. the window closes: maintenance off, silence expired (failures here change nothing back)
            if app is not None:
                with window.step("maintenance off"):
                    set_maintenance(app, False)
                    window.maintenance_on = False
            if alertmanager is not None:
                with window.step("expire silence"):
                    _expire(alertmanager, window)
        except BaseException as exc:  # noqa: BLE001 - reported below, then re-raised
            failure = exc
    if target == "kubernetes" and cluster is not None and before:
        window.after = _images_now(cluster, ns, before)
    elif target == "compose-ssh" and ssh is not None and project is not None and variables:
        text = _safe_read(ssh, project.env_path)
        window.after = {k: str(v) for k, v in env_values(text or "", list(variables)).items()}
    outcome = _outcome(window, failure, undo)
    _summary(window, outcome, undo, reason)
    if isinstance(failure, Exception):
        raise WindowFailed(outcome) from failure
    if failure is not None:
        raise failure
    if window.findings:
        raise WindowFailed(f"the window closed normally, but housekeeping found: {'; '.join(window.findings)}")
    return MaintenanceResult(outcome=outcome, silence_id=window.silence.id if window.silence else None,
                             backup_set_id=window.backup_set_id, restore_point=window.restore_point,
                             restore_point_lsn=window.restore_point_lsn, images_before=window.before,
                             images_after=window.after, steps=[_step_row(s) for s in window.steps])


# -- steps and undos -----------------------------------------------------------------------------------------------


def _undo_step(window: Window, name: str, undo: Callable[[], Any]) -> Callable[[], None]:
    """An undo that is timed as a step of the summary."""
    def run() -> None:
        with window.step(name):
            undo()
    return run


def _expire(am: AlertmanagerAPI, window: Window) -> None:
    if window.silence is None or window.silence_expired:
        return
    expire_silence(am, window.silence.id)
    window.silence_expired = True


def _off_when_healthy(app: AppEndpoint, health: _Health, window: Window) -> None:
    """Maintenance off only when the app's health endpoint passes; otherwise it stays ON and this raises.

    The Prometheus checks gate the *new* version; after a failure what runs is the recorded version, which
    was serving before the window, so its health endpoint is the gate (a check still above its threshold on
    a stale sample would otherwise keep a good old version closed)."""
    wait_until_healthy(app, timeout_seconds=health.timeout, interval_seconds=min(health.poll, 2),
                       left_as="maintenance mode stays ON")
    set_maintenance(app, False)
    window.maintenance_on = False


def _restore_deployment(cluster: KubernetesCluster, state: DeploymentState, timeout: float,
                        poll: float) -> Callable[[], None]:
    def undo() -> None:
        apply_pod_template(cluster, state.namespace, state.name, state.template, state.annotations)
        wait_for_rollout(cluster, state.namespace, state.name, timeout_seconds=timeout, interval_seconds=poll)
    return undo


def _restore_compose(host: SSHHost, project: ComposeProject, service: str, original: str, timeout: float,
                     poll: float) -> Callable[[], None]:
    def undo() -> None:
        write_remote_file(host, project.env_path, original)
        pull_and_up(host, project, [service])
        wait_compose_healthy(host, project, [service], timeout_seconds=timeout, interval_seconds=poll)
    return undo


def _migrate(window: Window, target: str, cluster: KubernetesCluster | None, ns: str, before: list[DeploymentState],
             wanted: dict[str, str] | None, container: str, command: list[str], timeout: float, poll: float,
             ssh: SSHHost | None, compose_dir: str) -> str:
    """Run the migration, keep its logs as an artifact; a failure sets ``window.migration_failed`` and raises."""
    if target == "kubernetes":
        assert cluster is not None
        state = before[0]
        name_in_pod = container or next(iter(state.images))
        image = (wanted or {}).get(name_in_pod, state.images[name_in_pod])
        name = job_name("migrate", window.run_name)
        body = migration_job_body(name, state.template, name_in_pod, image, command,
                                  {WINDOW_BY: window.run_name[:63]}, int(timeout))
        start_job(cluster, ns, body)
        outcome = wait_for_job(cluster, ns, name, timeout_seconds=timeout, interval_seconds=min(poll, 2))
        logs = job_logs(cluster, ns, name)
        where, ok, why = f"job {ns}/{name} ({image})", outcome.succeeded, outcome.reason
    else:
        assert ssh is not None
        argv = ["sh", "-c", 'cd "$1" && shift && exec "$@"', "migrate", compose_dir, *command] if compose_dir \
            else list(command)
        result = run_remote(ssh, argv, check=False, timeout_seconds=timeout)
        logs = {ssh.describe(): result.stdout + result.stderr}
        where, ok, why = f"`{' '.join(command)}` on `{ssh.describe()}`", result.exit_code == 0, \
            f"exit {result.exit_code}"
    lines = [f"# Migration: {where}: {'succeeded' if ok else 'FAILED (' + why + ')'}", ""]
    for source, text in logs.items():
        tail = text[-MAX_LOG_CHARS:]
        lines += [f"## `{source}`", "", "```", tail.replace("```", "'''"), "```", ""]
    create_markdown_artifact("\n".join(lines), key="maintenance-migration-logs",
                             description="Migration output")
    window.migration = f"{where}: {'succeeded' if ok else 'FAILED: ' + why}"
    if not ok:
        window.migration_failed = True
        raise MigrationFailed(f"migration {where} failed ({why}); see the migration logs artifact")
    return f"succeeded ({where})"


def _housekeep(name: str, ssh: SSHHost, real: bool, certificates: list[str], min_days: float, disk_paths: list[str],
               max_percent: float, config: str, state: str, force: bool) -> HousekeepingResult:
    if name == "apt-upgrade":
        return apt_upgrade(ssh, real=real)
    if name == "container-prune":
        return prune_containers(ssh)
    if name == "certificate-expiry":
        return check_certificates(ssh, certificates, min_days=min_days)
    if name == "disk-usage":
        return check_disk_usage(ssh, disk_paths, max_percent=max_percent)
    if name == "log-rotation":
        return rotate_logs(ssh, config, state_file=state, force=force)
    raise ConfigurationError(f"unknown housekeeping step {name!r}")


def _images_now(cluster: KubernetesCluster, ns: str, before: list[DeploymentState]) -> dict[str, str]:
    try:
        now = record_deployments(cluster, ns, [s.name for s in before])
    except Exception as exc:  # noqa: BLE001 - the report is written even when the API is gone
        run_logger().error("could not record the images after the window: %s", exc)
        return {}
    return {f"{s.target}/{c}": i for s in now for c, i in s.images.items()}


def _safe_read(host: SSHHost, path: str) -> str | None:
    try:
        return read_remote_file(host, path)
    except Exception as exc:  # noqa: BLE001 - the report is written even when the host is gone
        run_logger().error("could not read %s after the window: %s", path, exc)
        return None


# -- the report -------------------------------------------------------------------------------------------------


def _outcome(window: Window, failure: BaseException | None, undo: UndoStack) -> str:
    if failure is None:
        done = {s.step: s.result for s in window.steps}
        parts = [what for step, what in [("update", "updated"), ("migration", "migrated"), ("backup", "backed up")]
                 if step in done and not done[step].startswith("skipped")]
        parts.append("healthy")
        if "maintenance off" in done:
            parts.append("maintenance off")
        if window.silence_expired:
            parts.append("silence expired")
        if window.findings:
            parts.append(f"{len(window.findings)} housekeeping finding(s)")
        return "completed: " + ", ".join(parts)
    parts = [f"FAILED: {failure}"]
    failed_undos = [o for o in undo.outcomes if not o.ok]
    if window.before and undo.outcomes:
        put_back = [o for o in undo.outcomes if o.step.startswith("put ")]
        if put_back and all(o.ok for o in put_back):
            parts.append("the update was put back to the recorded version")
        elif put_back:
            parts.append("putting the update back FAILED")
    for o in failed_undos:
        parts.append(f"{o.step}: FAILED ({o.error})")
    if window.maintenance_on:
        parts.append("MAINTENANCE MODE STAYS ON (the app is not healthy): act now")
    elif any(s.step == "maintenance on" for s in window.steps):
        parts.append("maintenance mode is off again")
    if window.silence is not None:
        parts.append("silence expired" if window.silence_expired else
                     f"silence {window.silence.id} NOT expired: it ends by itself at "
                     f"{window.silence.ends_at:%Y-%m-%d %H:%M:%S} UTC")
    if window.migration_failed:
        parts.append(_way_back(window))
    return "; ".join(parts)


def _way_back(window: Window) -> str:
    """What a failed migration leaves, and the runbooks that go back to before it."""
    text = "the migration is NOT undone (the database may be partly migrated)"
    if window.restore_point:
        text += (f"; to go back: `pitr-restore` to restore point `{window.restore_point}` "
                 f"(LSN {window.restore_point_lsn})")
    if window.backup_set_id:
        text += f"; or `disaster-recovery` from backup set `{window.backup_set_id}` ({window.backup_store})"
    return text


def _step_row(s: StepRecord) -> dict[str, Any]:
    return {"step": s.step, "started": f"{s.started:%H:%M:%S}", "seconds": s.seconds, "result": s.result}


def _summary(window: Window, outcome: str, undo: UndoStack, reason: str) -> None:
    create_table_artifact([_step_row(s) for s in window.steps], key="maintenance-steps",
                          description="Each step of the maintenance window, timed")
    lines = [f"# Maintenance window `{window.run_name}`", "", f"**{outcome}**", "", f"- reason: {reason}",
             f"- ended at {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC"]
    if window.silence is not None:
        lines.append(f"- silence `{window.silence.id}` ({', '.join(window.silence.matchers)}), until "
                     f"{window.silence.ends_at:%Y-%m-%d %H:%M:%S} UTC: "
                     f"{'expired' if window.silence_expired else 'NOT expired'}")
    lines.append(f"- backup set: `{window.backup_set_id}` in `{window.backup_store}`" if window.backup_set_id
                 else "- backup set: none")
    lines.append(f"- restore point: `{window.restore_point}` at {window.restore_point_lsn}" if window.restore_point
                 else "- restore point: none")
    lines.append(f"- migration: {window.migration}")
    lines.append(f"- maintenance mode: {'ON' if window.maintenance_on else 'off'}")
    if window.migration_failed:
        lines.append(f"- {_way_back(window)}")
    lines += ["", "| step | started (UTC) | seconds | result |", "|---|---|---|---|"]
    lines += [f"| {s.step} | {s.started:%H:%M:%S} | {s.seconds} | {s.result.replace('|', '/')} |"
              for s in window.steps]
    if window.before:
        lines += ["", "| what | before | after |", "|---|---|---|"]
        lines += [f"| `{k}` | `{v}` | `{window.after.get(k, '?')}` |" for k, v in window.before.items()]
    if window.checks:
        lines += ["", "| check | max | worst | result |", "|---|---|---|---|"]
        lines += [f"| `{r.name}` | {r.max:g} | {r.worst if r.worst is not None else '-'} | "
                  f"{'pass' if r.passed else 'FAIL: ' + r.detail} |" for r in window.checks]
    if window.findings:
        lines += ["", "Housekeeping findings:", *[f"- {f}" for f in window.findings]]
    if window.housekeeping:
        out = ["# Housekeeping output", ""]
        for h in window.housekeeping:
            out += [f"## {h.step}: {'ok' if h.ok else 'FAILED'}: {h.summary}", "",
                    *[f"`{c}`" for c in h.commands], "", "```", h.output.replace("```", "'''"), "```", ""]
        create_markdown_artifact("\n".join(out), key="maintenance-housekeeping", description="Housekeeping output")
    if undo.outcomes:
        lines += ["", "Undone (newest first):", *[f"- {o.step}: {'ok' if o.ok else 'FAILED: ' + o.error}"
                                                  for o in undo.outcomes]]
    create_markdown_artifact("\n".join(lines), key="maintenance-summary", description="Maintenance window summary")
    run_logger().info("maintenance window %s: %s", window.run_name, outcome)


def _run_name() -> str:
    from prefect.context import get_run_context

    try:
        return str(get_run_context().flow_run.name)  # type: ignore[union-attr]
    except (RuntimeError, AttributeError):
        return datetime.now(UTC).strftime("run-%Y%m%dT%H%M%SZ")
