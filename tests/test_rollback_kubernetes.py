"""tasks/kubernetes.py through the real `kubernetes` client: against the HTTP double (tests/k8s_double.py), and
the same scenarios against a real cluster in the ``kind`` suite when KUBECONFIG is set."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from blocks.errors import ConfigurationError
from blocks.kubernetes import KubernetesCluster
from tasks.kubernetes import (
    REVISION,
    RolloutFailed,
    apply_pod_template,
    images_plan,
    parse_images,
    plan_revision_rollback,
    record_deployments,
    rollout_undo_plan,
    set_images,
    wait_for_rollout,
)
from tests.k8s_scenarios import (
    BROKEN,
    GOOD_V1,
    GOOD_V2,
    container,
    double_cluster,
    env_of,
    make_deployment,
    on_double,
    read,
    real_cluster,
)

V1_ENV = {"MODE": "one", "FEATURE_X": "off"}
V2_ENV = {"MODE": "two", "FEATURE_X": "on", "NEW_ONLY": "1"}


@pytest.fixture(params=["double", pytest.param("kind", marks=pytest.mark.kind)])
def cluster(request: pytest.FixtureRequest) -> Iterator[KubernetesCluster]:
    make = double_cluster if request.param == "double" else real_cluster
    with make() as (block, _kube):
        yield block


def fast(cluster: KubernetesCluster) -> dict[str, float]:
    double = on_double(cluster)
    return {"interval_seconds": 0.05 if double else 2, "timeout_seconds": 20 if double else 300}


def test_previous_restores_the_previous_template_images_and_env(cluster: KubernetesCluster) -> None:
    make_deployment(cluster, "api", [(GOOD_V1, V1_ENV), (GOOD_V2, V2_ENV)])
    [state] = record_deployments.fn(cluster, cluster.namespace, ["api"])
    assert state.images == {"api": GOOD_V2} and state.revision == 2 and state.available == 3
    assert set(state.env["api"]) == set(V2_ENV) and all(v.startswith("sha256:") for v in state.env["api"].values())

    plan = plan_revision_rollback.fn(cluster, state, 0)
    assert (plan.from_revision, plan.to_revision, plan.images, plan.unchanged) == (2, 1, {"api": GOOD_V1}, False)
    apply_pod_template.fn(cluster, cluster.namespace, "api", plan.template, plan.annotations)
    rollout = wait_for_rollout.fn(cluster, cluster.namespace, "api", **fast(cluster))

    after = read(cluster, "api")
    assert container(after)["image"] == GOOD_V1 and env_of(after) == V1_ENV  # NEW_ONLY is gone too
    assert "pod-template-hash" not in after["spec"]["template"]["metadata"]["labels"]
    status = after["status"]
    assert rollout.available == 3 == status["availableReplicas"] == status["updatedReplicas"] == status["replicas"]
    assert rollout.revision == 3 == int(after["metadata"]["annotations"][REVISION])  # the old RS, next revision
    if on_double(cluster):
        assert rollout.polls >= 3  # the double's controller needs several polls: the wait really waited


def test_a_revision_number_rolls_back_to_that_revision(cluster: KubernetesCluster) -> None:
    make_deployment(cluster, "api", [(GOOD_V1, V1_ENV), (GOOD_V2, V2_ENV), (GOOD_V2, {"MODE": "three"})])
    [state] = record_deployments.fn(cluster, cluster.namespace, ["api"])
    assert state.revision == 3
    plan = plan_revision_rollback.fn(cluster, state, 1)
    apply_pod_template.fn(cluster, cluster.namespace, "api", plan.template, plan.annotations)
    wait_for_rollout.fn(cluster, cluster.namespace, "api", **fast(cluster))
    after = read(cluster, "api")
    assert container(after)["image"] == GOOD_V1 and env_of(after) == V1_ENV
    with pytest.raises(ConfigurationError, match="has no revision 9"):
        plan_revision_rollback.fn(cluster, state, 9)


def test_explicit_images_set_exactly_those(cluster: KubernetesCluster) -> None:
    make_deployment(cluster, "api", [(GOOD_V1, V1_ENV), (GOOD_V2, V2_ENV)])
    before = read(cluster, "api")
    images = parse_images([f"api={GOOD_V1}"])
    set_images.fn(cluster, cluster.namespace, "api", images)
    wait_for_rollout.fn(cluster, cluster.namespace, "api", **fast(cluster))
    after = read(cluster, "api")
    assert container(after)["image"] == GOOD_V1
    assert env_of(after) == V2_ENV  # only the image changed
    same = {**before["spec"]["template"]}
    same["spec"] = {**same["spec"], "containers": [{**container(before), "image": GOOD_V1}]}
    assert after["spec"]["template"] == same


def test_broken_image_fails_with_progress_deadline_and_the_deployment_name(cluster: KubernetesCluster) -> None:
    make_deployment(cluster, "api", [(GOOD_V1, V1_ENV)])
    set_images.fn(cluster, cluster.namespace, "api", {"api": BROKEN})
    with pytest.raises(RolloutFailed) as caught:
        wait_for_rollout.fn(cluster, cluster.namespace, "api", **fast(cluster))
    message = str(caught.value)
    assert "ProgressDeadlineExceeded" in message and f'"{cluster.namespace}/api"' in message
    assert "last event: Warning" in message and "broken" in message
    assert read(cluster, "api")["status"]["availableReplicas"] == 3  # the old pods still serve


def test_unknown_deployment_and_selector_are_refused(cluster: KubernetesCluster) -> None:
    with pytest.raises(ConfigurationError, match="does not exist; nothing was changed"):
        record_deployments.fn(cluster, cluster.namespace, ["nope"])
    with pytest.raises(ConfigurationError, match="no deployment"):
        record_deployments.fn(cluster, cluster.namespace, None, "app=nope")


def test_selector_finds_every_matching_deployment(cluster: KubernetesCluster) -> None:
    make_deployment(cluster, "api", [(GOOD_V1, V1_ENV)], labels={"tier": "web"})
    make_deployment(cluster, "worker", [(GOOD_V1, V1_ENV)], labels={"tier": "web"})
    make_deployment(cluster, "other", [(GOOD_V1, V1_ENV)])
    states = record_deployments.fn(cluster, cluster.namespace, None, "tier=web")
    assert sorted(s.name for s in states) == ["api", "worker"]


# -- the Block ---------------------------------------------------------------------------------------------------


def test_wrong_token_is_a_clear_error_without_the_token() -> None:
    with double_cluster() as (block, kube):
        config = block.kubeconfig.get_secret_value().replace(kube.token, "wrong-" + kube.token[:4] + "x" * 20)
        bad = KubernetesCluster(kubeconfig=SecretStr(config), namespace="shop")
        with pytest.raises(ConfigurationError) as caught:
            record_deployments.fn(bad, "shop", ["api"])
        assert "refused the credentials" in str(caught.value) and kube.token not in str(caught.value)
        assert kube.unauthorized == 1
        assert kube.token not in repr(block) and kube.token not in block.describe()
        assert block.describe() == f"{kube.url}/shop"


def test_bad_kubeconfig_and_no_in_cluster_account() -> None:
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        KubernetesCluster(kubeconfig=SecretStr("a: [b"), namespace="x").get_client()
    with pytest.raises(ConfigurationError, match="in-cluster"):
        KubernetesCluster(namespace="x").get_client()


# -- pure --------------------------------------------------------------------------------------------------------


def _rs(uid: str, revision: int, image: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": f"api-{revision}", "ownerReferences": [{"uid": uid, "controller": True}],
                         "annotations": {REVISION: str(revision), **(annotations or {})}},
            "spec": {"template": {"metadata": {"labels": {"app": "api", "pod-template-hash": f"h{revision}"}},
                                  "spec": {"containers": [{"name": "api", "image": image}]}}}}


def _deployment(revision: int, image: str, paused: bool = False) -> dict[str, Any]:
    return {"metadata": {"name": "api", "namespace": "shop", "uid": "u1",
                         "annotations": {REVISION: str(revision), "team": "web"}},
            "spec": {"paused": paused, "template": {"metadata": {"labels": {"app": "api"}},
                                                    "spec": {"containers": [{"name": "api", "image": image}]}}}}


def test_rollout_undo_plan_follows_kubectl() -> None:
    sets = [_rs("u1", 1, "a:1", {"note": "first"}), _rs("u1", 3, "a:3"), _rs("u1", 2, "a:2"),
            _rs("other", 9, "x:9")]  # another Deployment's ReplicaSet is never chosen
    plan = rollout_undo_plan(_deployment(3, "a:3"), sets, 0)
    assert (plan.to_revision, plan.images) == (2, {"api": "a:2"})
    assert plan.template["metadata"]["labels"] == {"app": "api"}  # hash label dropped
    first = rollout_undo_plan(_deployment(3, "a:3"), sets, 1)
    # the ReplicaSet's annotations replace the Deployment's, except the Deployment's revision bookkeeping
    assert first.annotations == {REVISION: "3", "note": "first"}
    assert rollout_undo_plan(_deployment(3, "a:3"), sets, 3).unchanged
    with pytest.raises(ConfigurationError, match="paused"):
        rollout_undo_plan(_deployment(3, "a:3", paused=True), sets, 0)
    with pytest.raises(ConfigurationError, match="no rollout history"):
        rollout_undo_plan(_deployment(1, "a:1"), [_rs("u1", 1, "a:1")], 0)


def test_parse_images_rejects_bad_input() -> None:
    assert parse_images(["api=registry/app:v1.1.0", " worker = r/w:2 "]) == {"api": "registry/app:v1.1.0",
                                                                            "worker": "r/w:2"}
    for bad in (["api"], ["=x:1"], ["api="], ["api=a b"]):
        with pytest.raises(ConfigurationError):
            parse_images(bad)


def test_images_plan_keeps_other_containers() -> None:
    from tasks.kubernetes import state_of

    raw = _deployment(2, "a:2")
    raw["spec"]["template"]["spec"]["containers"].append({"name": "sidecar", "image": "s:1"})
    raw["spec"]["replicas"] = 2
    plan = images_plan(state_of(raw), {"api": "a:1"})
    assert plan.images == {"api": "a:1", "sidecar": "s:1"} and not plan.unchanged
