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

The window's record and summary are in flows/_maintenance_window.py; the steps that are more than one task
call (health gate, undos, migration, housekeeping) in flows/_maintenance_steps.py.
"""

from __future__ import annotations

from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from prefect import flow
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
from flows._maintenance_steps import (
    WINDOW_BY,
    Health,
    expire_window_silence,
    housekeep,
    images_now,
    migrate,
    off_when_healthy,
    prove_healthy,
    restore_compose,
    restore_deployment,
    undo_step,
)
from flows._maintenance_window import Window, flow_run_name, step_row, window_outcome, write_summary
from flows.backup import backup
from tasks.alertmanager import create_silence, matchers_of, silence_end
from tasks.app import set_maintenance
from tasks.approval import refused_at_start
from tasks.compose import ComposeProject, check_variables, env_values, pull_and_up, set_env_lines, wait_compose_healthy
from tasks.drain import DrainTimeout, wait_until_drained
from tasks.housekeeping import Step
from tasks.kubernetes import DeploymentState, parse_images, record_deployments, set_images, wait_for_rollout
from tasks.locks import ensure_lock, lock_name
from tasks.log import run_logger
from tasks.metrics import push_flow_run_metrics
from tasks.notify import notify_hook
from tasks.pitr.restore_points import create_restore_point
from tasks.prometheus import MetricCheck
from tasks.ssh import read_remote_file, read_remote_file_for_report, write_remote_file
from tasks.undo import UndoStack

Target = Literal["kubernetes", "compose-ssh", "none"]


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
    health = Health(app, prometheus, checks or [], health_timeout_seconds, poll_seconds, check_interval_seconds)
    window = Window(run_name=flow_run_name())

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
                        undo.register("expire the silence",
                                      undo_step(window, "undo: expire the silence",
                                                lambda: expire_window_silence(alertmanager, window)))
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
                                      undo_step(window, "undo: health, then maintenance off",
                                                lambda: off_when_healthy(app, health, window)))
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
                        done = housekeep(name, ssh, apt_real_upgrade, certificates or [], certificate_min_days,
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
                                          undo_step(window, f"undo: put {state.target} back",
                                                    restore_deployment(cluster, state, rollout_timeout_seconds,
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
                                      undo_step(window, f"undo: put {compose_service} back",
                                                restore_compose(ssh, project, compose_service, original_env,
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
                        record.result = migrate(window, target, cluster, ns, before, wanted, migration_container,
                                                migration_command, migration_timeout_seconds, poll_seconds, ssh,
                                                compose_dir)
                else:
                    window.skip("migration", "no migration_command")
                # 7. health
                with window.step("health"):
                    prove_healthy(health, window, "putting the update back")
            # 8. the window closes: maintenance off, silence expired (failures here change nothing back)
            if app is not None:
                with window.step("maintenance off"):
                    set_maintenance(app, False)
                    window.maintenance_on = False
            if alertmanager is not None:
                with window.step("expire silence"):
                    expire_window_silence(alertmanager, window)
        except BaseException as exc:  # noqa: BLE001 - reported below, then re-raised
            failure = exc
    if target == "kubernetes" and cluster is not None and before:
        window.after = images_now(cluster, ns, before)
    elif target == "compose-ssh" and ssh is not None and project is not None and variables:
        text = read_remote_file_for_report(ssh, project.env_path, "after the window")
        window.after = {k: str(v) for k, v in env_values(text or "", list(variables)).items()}
    outcome = window_outcome(window, failure, undo)
    write_summary(window, outcome, undo, reason)
    if isinstance(failure, Exception):
        raise WindowFailed(outcome) from failure
    if failure is not None:
        raise failure
    if window.findings:
        raise WindowFailed(f"the window closed normally, but housekeeping found: {'; '.join(window.findings)}")
    return MaintenanceResult(outcome=outcome, silence_id=window.silence.id if window.silence else None,
                             backup_set_id=window.backup_set_id, restore_point=window.restore_point,
                             restore_point_lsn=window.restore_point_lsn, images_before=window.before,
                             images_after=window.after, steps=[step_row(s) for s in window.steps])
