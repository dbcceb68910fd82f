"""tasks/kubernetes_jobs.py through the real `kubernetes` client: against the Jobs double (tests/k8s_jobs_double.py,
where the Job's command runs as a local process), and the same scenarios against a real cluster in the ``kind``
suite when KUBECONFIG is set (the Job then runs $RUNBOOKS_KIND_JOB_IMAGE, default busybox)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pydantic import SecretStr

from blocks.kubernetes import KubernetesCluster
from tasks.kubernetes import record_deployments
from tasks.kubernetes_jobs import job_logs, migration_job_body, start_job, wait_for_job
from tests.k8s_jobs_double import JobsDouble
from tests.k8s_scenarios import GOOD_V1, make_deployment, on_double, real_cluster

JOB_IMAGE = os.environ.get("RUNBOOKS_KIND_JOB_IMAGE", "busybox:1.36")


@contextmanager
def jobs_cluster() -> Iterator[tuple[KubernetesCluster, JobsDouble]]:
    with JobsDouble() as kube:
        yield KubernetesCluster(kubeconfig=SecretStr(kube.kubeconfig("shop")), namespace="shop"), kube


@pytest.fixture(params=["double", pytest.param("kind", marks=pytest.mark.kind)])
def cluster(request: pytest.FixtureRequest) -> Iterator[KubernetesCluster]:
    make = jobs_cluster if request.param == "double" else real_cluster
    with make() as (block, _kube):
        make_deployment(block, "api", [(GOOD_V1, {"GREETING": "hello from the app env"})], replicas=1)
        yield block


def run_job(cluster: KubernetesCluster, script: str) -> tuple[bool, str, str]:
    [state] = record_deployments.fn(cluster, cluster.namespace, ["api"])
    name = f"migrate-{uuid.uuid4().hex[:8]}"
    body = migration_job_body(name, state.template, "api", JOB_IMAGE, ["sh", "-c", script], {"test": "yes"}, 120)
    start_job.fn(cluster, cluster.namespace, body)
    assert start_job.fn(cluster, cluster.namespace, body) == name  # started again (a retry): the same Job
    double = on_double(cluster)
    outcome = wait_for_job.fn(cluster, cluster.namespace, name, timeout_seconds=30 if double else 300,
                              interval_seconds=0.05 if double else 2)
    logs = job_logs.fn(cluster, cluster.namespace, name)
    return outcome.succeeded, outcome.reason, "\n".join(logs.values())


def test_a_job_that_succeeds_has_the_apps_environment_and_its_logs(cluster: KubernetesCluster) -> None:
    ok, reason, logs = run_job(cluster, 'echo "migrating: $GREETING"; echo done')
    assert ok, reason
    assert "migrating: hello from the app env" in logs and "done" in logs


def test_a_job_that_fails_is_not_retried_and_keeps_its_logs(cluster: KubernetesCluster) -> None:
    ok, reason, logs = run_job(cluster, "echo 'ERROR: duplicate column' >&2; exit 3")
    assert not ok and "BackoffLimitExceeded" in reason
    assert "ERROR: duplicate column" in logs
