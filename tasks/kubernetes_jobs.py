"""Kubernetes Jobs for a migration: built from a Deployment's recorded pod template (so the Job has the app's
environment, Secrets and service account) with the new image and the migration's command; started, waited
for, and its pods' logs kept. The Job is never retried by Kubernetes (backoffLimit 0): a migration that
fails half-way is reported, not run again by a controller."""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from typing import Any

from kubernetes.client import BatchV1Api, CoreV1Api
from kubernetes.client.exceptions import ApiException
from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.errors import ConfigurationError, RunbookError
from blocks.kubernetes import KubernetesCluster
from tasks.kubernetes import _api_error, _json
from tasks.log import run_logger

MAX_LOG_BYTES = 256 * 1024  # per pod: the end of the log is what explains a failure


class MigrationFailed(RunbookError):
    """The migration exited non-zero (or did not finish in time); it is not undone by guessing."""


def job_name(prefix: str, run_name: str) -> str:
    """A DNS-1123 name, at most 63 characters, deterministic for a run (a re-run finds its own Job)."""
    text = re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{run_name}".lower()).strip("-")
    return text[:63].rstrip("-")


def migration_job_body(name: str, template: dict[str, Any], container: str, image: str, command: list[str],
                       labels: dict[str, str], timeout_seconds: int) -> dict[str, Any]:
    """A batch/v1 Job running ``command`` in ``container`` of the Deployment's pod template, with ``image``.

    Other containers are dropped (sidecars would keep the pod running); probes and ports go (a migration
    serves nothing); the pod's labels are replaced (no Service selects it, so it gets no traffic); the
    environment, volumes and service account stay."""
    if not command or not all(isinstance(a, str) and a for a in command):
        raise ConfigurationError("the migration command must be a non-empty argv list, e.g. "
                                 "['alembic', 'upgrade', 'head']")
    pod = copy.deepcopy(template)
    spec = pod.setdefault("spec", {})
    found = [c for c in spec.get("containers", []) if c.get("name") == container]
    if not found:
        raise ConfigurationError(f"the pod template has no container {container!r} "
                                 f"(containers: {[c.get('name') for c in spec.get('containers', [])]})")
    main = found[0]
    main.update(image=image, command=list(command))
    main.pop("args", None)
    for key in ("livenessProbe", "readinessProbe", "startupProbe", "ports", "lifecycle"):
        main.pop(key, None)
    spec["containers"] = [main]
    spec["restartPolicy"] = "Never"
    meta = pod.setdefault("metadata", {})
    meta["labels"] = {**labels, "job-name": name}
    meta.pop("annotations", None)
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": labels},
            "spec": {"backoffLimit": 0, "activeDeadlineSeconds": int(timeout_seconds),
                     "ttlSecondsAfterFinished": 7 * 86400, "template": pod}}


@dataclass(frozen=True)
class JobOutcome:
    namespace: str
    name: str
    succeeded: bool
    reason: str
    seconds: float


@task(retries=2, retry_delay_seconds=[1, 3], cache_policy=NO_CACHE)
def start_job(cluster: KubernetesCluster, namespace: str, body: dict[str, Any]) -> str:
    """Create the Job; one of that name made by this run already (a retry) is taken as started."""
    api = cluster.get_client()
    name = body["metadata"]["name"]
    try:
        BatchV1Api(api).create_namespaced_job(namespace, body)
    except ApiException as exc:
        if exc.status != 409:
            raise _api_error(f"creating job {namespace}/{name}", exc) from None
    finally:
        api.close()
    image = body["spec"]["template"]["spec"]["containers"][0]["image"]
    run_logger().info("job %s/%s started (%s)", namespace, name, image)
    return name


def job_state(raw: dict[str, Any]) -> tuple[bool | None, str]:
    """(True succeeded / False failed / None running, why) of a Job's JSON."""
    status = raw.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return True, "Complete"
        if condition.get("type") == "Failed":
            return False, f"{condition.get('reason', 'Failed')}: {condition.get('message', '')}".strip(": ")
    if int(status.get("succeeded") or 0) > 0:
        return True, "succeeded"
    if int(status.get("failed") or 0) > 0:
        return False, f"{status['failed']} pod(s) failed"
    return None, f"{int(status.get('active') or 0)} pod(s) active"


@task(cache_policy=NO_CACHE)
def wait_for_job(cluster: KubernetesCluster, namespace: str, name: str, *, timeout_seconds: float,
                 interval_seconds: float = 2) -> JobOutcome:
    """Poll the Job until it completes or fails; the timeout counts as a failure (the Job's own
    activeDeadlineSeconds stops it on the cluster)."""
    started = time.monotonic()
    api = cluster.get_client()
    batch = BatchV1Api(api)
    try:
        while True:
            try:
                raw = _json(api, batch.read_namespaced_job(name, namespace))
                done, why = job_state(raw)
            except ApiException as exc:
                if exc.status < 500 and exc.status != 429:
                    raise _api_error(f"job {namespace}/{name}", exc) from None
                done, why = None, f"API HTTP {exc.status}"
            seconds = round(time.monotonic() - started, 2)
            if done is not None:
                run_logger().info("job %s/%s %s after %.1f s (%s)", namespace, name,
                                  "succeeded" if done else "FAILED", seconds, why)
                return JobOutcome(namespace, name, done, why, seconds)
            if seconds + interval_seconds > timeout_seconds:
                run_logger().error("job %s/%s not finished after %.0f s (%s)", namespace, name, timeout_seconds, why)
                return JobOutcome(namespace, name, False, f"not finished after {timeout_seconds:.0f} s ({why})",
                                  seconds)
            time.sleep(interval_seconds)
    finally:
        api.close()


@task(retries=2, retry_delay_seconds=[1, 3], cache_policy=NO_CACHE)
def job_logs(cluster: KubernetesCluster, namespace: str, name: str) -> dict[str, str]:
    """pod name -> the end of its log (at most MAX_LOG_BYTES each), for every pod of the Job."""
    api = cluster.get_client()
    core = CoreV1Api(api)
    logs: dict[str, str] = {}
    try:
        pods = _json(api, core.list_namespaced_pod(namespace, label_selector=f"job-name={name}")).get("items", [])
        for pod in pods:
            pod_name = pod["metadata"]["name"]
            try:
                text = core.read_namespaced_pod_log(pod_name, namespace, limit_bytes=MAX_LOG_BYTES)
            except ApiException as exc:
                text = f"(log not readable: HTTP {exc.status})"
            logs[pod_name] = str(text)
    except ApiException as exc:
        raise _api_error(f"pods of job {namespace}/{name}", exc) from None
    finally:
        api.close()
    run_logger().info("job %s/%s: logs of %d pod(s) kept", namespace, name, len(logs))
    return logs
