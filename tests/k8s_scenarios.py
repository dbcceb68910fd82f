"""Scenario setup shared by the Kubernetes tests: every object is made through the real client, so the same
setup runs against the HTTP double (tests/k8s_double.py) and, for the ``kind`` suite, a real cluster."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from kubernetes.client import AppsV1Api, CoreV1Api
from pydantic import SecretStr

from blocks.kubernetes import KubernetesCluster
from tests.k8s_double import KubeDouble

# Real clusters pull images: the kind suite uses tiny public images; `broken` is a tag that does not exist.
GOOD_V1 = os.environ.get("RUNBOOKS_KIND_IMAGE_V1", "registry.k8s.io/pause:3.9")
GOOD_V2 = os.environ.get("RUNBOOKS_KIND_IMAGE_V2", "registry.k8s.io/pause:3.10")
BROKEN = "registry.k8s.io/pause:broken"


def on_double(cluster: KubernetesCluster) -> bool:
    """The HTTP double serves plain http on loopback; a real cluster (kind included) speaks https."""
    return cluster.describe().startswith("http://127.0.0.1:")


def deployment_body(name: str, image: str, env: dict[str, str], replicas: int = 3, labels: dict[str, str] | None = None,
                    deadline: int = 2) -> dict[str, Any]:
    pod_labels = {"app": name, **(labels or {})}
    variables = [{"name": k, "value": v} for k, v in env.items()]
    return {"metadata": {"name": name, "labels": {"app": name, **(labels or {})}},
            "spec": {"replicas": replicas, "progressDeadlineSeconds": deadline,
                     "selector": {"matchLabels": pod_labels},
                     "template": {"metadata": {"labels": pod_labels},
                                  "spec": {"containers": [{"name": "api", "image": image,
                                                           "env": variables}]}}}}


def settle(cluster: KubernetesCluster, name: str, timeout: float = 120) -> dict[str, Any]:
    """Poll through the client until the Deployment's rollout is complete (setup, not the code under test)."""
    from tasks.kubernetes import rollout_progress

    api = cluster.get_client()
    apps = AppsV1Api(api)
    deadline = time.monotonic() + timeout
    try:
        while True:
            raw = api.sanitize_for_serialization(apps.read_namespaced_deployment(name, cluster.namespace))
            done, what, _ = rollout_progress(raw)
            if done:
                return raw
            if time.monotonic() > deadline:
                raise AssertionError(f"setup: {name} did not settle: {what}")
            time.sleep(0.02 if on_double(cluster) else 1)
    finally:
        api.close()


def make_deployment(cluster: KubernetesCluster, name: str, history: list[tuple[str, dict[str, str]]],
                    **kwargs: Any) -> dict[str, Any]:
    """A Deployment rolled out through ``history`` [(image, env), ...]: one revision each, the last current."""
    api = cluster.get_client()
    apps = AppsV1Api(api)
    image, env = history[0]
    deadline = 2 if on_double(cluster) else 20
    apps.create_namespaced_deployment(cluster.namespace,
                                      deployment_body(name, image, env, deadline=deadline, **kwargs))
    settle(cluster, name)
    for image, env in history[1:]:
        patch = {"spec": {"template": {"spec": {"containers": [
            {"name": "api", "image": image, "env": [{"name": k, "value": v} for k, v in env.items()]}]}}}}
        # a merge patch replaces the env list whole: each revision has exactly the env given
        apps.patch_namespaced_deployment(name, cluster.namespace, patch, _content_type="application/merge-patch+json")
        settle(cluster, name)
    api.close()
    return settle(cluster, name)


def read(cluster: KubernetesCluster, name: str) -> dict[str, Any]:
    api = cluster.get_client()
    try:
        return api.sanitize_for_serialization(AppsV1Api(api).read_namespaced_deployment(name, cluster.namespace))
    finally:
        api.close()


def container(raw: dict[str, Any], name: str = "api") -> dict[str, Any]:
    return next(c for c in raw["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def env_of(raw: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v.get("value", "") for v in container(raw).get("env") or []}


@contextmanager
def double_cluster() -> Iterator[tuple[KubernetesCluster, KubeDouble]]:
    with KubeDouble() as kube:
        yield KubernetesCluster(kubeconfig=SecretStr(kube.kubeconfig("shop")), namespace="shop"), kube


@contextmanager
def real_cluster() -> Iterator[tuple[KubernetesCluster, None]]:
    """A throwaway namespace in the cluster $KUBECONFIG points at (the ``kind`` suite)."""
    path = os.environ.get("KUBECONFIG")
    if not path:
        pytest.fail("the kind suite needs KUBECONFIG pointing at a disposable cluster (e.g. `kind create cluster`)")
    namespace = f"runbooks-test-{uuid.uuid4().hex[:6]}"
    cluster = KubernetesCluster(kubeconfig=SecretStr(open(path).read()), namespace=namespace)
    core = CoreV1Api(cluster.get_client())
    core.create_namespace({"metadata": {"name": namespace}})
    try:
        yield cluster, None
    finally:
        core.delete_namespace(namespace)
