"""The maintenance window's steps that are more than one task call: the health gate, the undos (each timed
as a step), the migration with its logs, the housekeeping dispatch, and reading the state after the window."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect.artifacts import create_markdown_artifact

from blocks.alertmanager import AlertmanagerAPI
from blocks.app import AppEndpoint
from blocks.errors import ConfigurationError
from blocks.kubernetes import KubernetesCluster
from blocks.prometheus import PrometheusAPI
from blocks.ssh import SSHHost
from flows._maintenance_window import Window
from tasks.alertmanager import expire_silence
from tasks.app import set_maintenance, wait_until_healthy
from tasks.compose import ComposeProject, pull_and_up, wait_compose_healthy
from tasks.housekeeping import (
    HousekeepingResult,
    apt_upgrade,
    check_certificates,
    check_disk_usage,
    prune_containers,
    rotate_logs,
)
from tasks.kubernetes import DeploymentState, apply_pod_template, record_deployments, wait_for_rollout
from tasks.kubernetes_jobs import MigrationFailed, job_logs, job_name, migration_job_body, start_job, wait_for_job
from tasks.log import run_logger
from tasks.prometheus import MetricCheck, MetricCheckFailed, check_metric
from tasks.ssh import run_remote, write_remote_file

WINDOW_BY = "runbooks.prefect.io/maintenance-window"
MAX_LOG_CHARS = 60_000  # per pod/command in the artifact: the end explains a failure


@dataclass(frozen=True)
class Health:
    app: AppEndpoint | None
    prometheus: PrometheusAPI | None
    checks: list[MetricCheck]
    timeout: float
    poll: float
    check_interval: float


def prove_healthy(health: Health, window: Window, left_as: str) -> None:
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


def undo_step(window: Window, name: str, undo: Callable[[], Any]) -> Callable[[], None]:
    """An undo that is timed as a step of the summary."""
    def run() -> None:
        with window.step(name):
            undo()
    return run


def expire_window_silence(am: AlertmanagerAPI, window: Window) -> None:
    if window.silence is None or window.silence_expired:
        return
    expire_silence(am, window.silence.id)
    window.silence_expired = True


def off_when_healthy(app: AppEndpoint, health: Health, window: Window) -> None:
    """Maintenance off only when the app's health endpoint passes; otherwise it stays ON and this raises.

    The Prometheus checks gate the *new* version; after a failure what runs is the recorded version, which
    was serving before the window, so its health endpoint is the gate (a check still above its threshold on
    a stale sample would otherwise keep a good old version closed)."""
    wait_until_healthy(app, timeout_seconds=health.timeout, interval_seconds=min(health.poll, 2),
                       left_as="maintenance mode stays ON")
    set_maintenance(app, False)
    window.maintenance_on = False


def restore_deployment(cluster: KubernetesCluster, state: DeploymentState, timeout: float,
                       poll: float) -> Callable[[], None]:
    def undo() -> None:
        apply_pod_template(cluster, state.namespace, state.name, state.template, state.annotations)
        wait_for_rollout(cluster, state.namespace, state.name, timeout_seconds=timeout, interval_seconds=poll)
    return undo


def restore_compose(host: SSHHost, project: ComposeProject, service: str, original: str, timeout: float,
                    poll: float) -> Callable[[], None]:
    def undo() -> None:
        write_remote_file(host, project.env_path, original)
        pull_and_up(host, project, [service])
        wait_compose_healthy(host, project, [service], timeout_seconds=timeout, interval_seconds=poll)
    return undo


def migrate(window: Window, target: str, cluster: KubernetesCluster | None, ns: str, before: list[DeploymentState],
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


def housekeep(name: str, ssh: SSHHost, real: bool, certificates: list[str], min_days: float, disk_paths: list[str],
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


def images_now(cluster: KubernetesCluster, ns: str, before: list[DeploymentState]) -> dict[str, str]:
    try:
        now = record_deployments(cluster, ns, [s.name for s in before])
    except Exception as exc:  # noqa: BLE001 - the report is written even when the API is gone
        run_logger().error("could not record the images after the window: %s", exc)
        return {}
    return {f"{s.target}/{c}": i for s in now for c, i in s.images.items()}
