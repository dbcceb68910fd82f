"""Kubernetes steps of the rollback runbook: record Deployments, roll back their pod template, wait for the
rollout, read and switch a Service's selector, check health through the API server's service proxy.

Pod templates travel as the API's own JSON (what ``ApiClient.sanitize_for_serialization`` gives), so what
is recorded is exactly what is patched back. Rolling back to a revision does what ``kubectl rollout undo``
does (kubectl ``pkg/polymorphichelpers/rollback.go``): take the ReplicaSet of that revision (``previous``:
the second-highest revision), drop its ``pod-template-hash`` label, and JSON-patch ``/spec/template`` and
``/metadata/annotations`` (the ReplicaSet's annotations, keeping the Deployment's own revision bookkeeping).
Waiting follows ``kubectl rollout status``. Environment values are never logged or reported: the record
keeps a short digest of each value, or the name of the Secret/ConfigMap it comes from.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import ApiClient, AppsV1Api, CoreV1Api
from kubernetes.client.exceptions import ApiException
from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.errors import ConfigurationError, RunbookError
from blocks.kubernetes import KubernetesCluster
from tasks.log import run_logger

REVISION = "deployment.kubernetes.io/revision"
HASH_LABEL = "pod-template-hash"
# kubectl's annotationsToSkip: the Deployment's own bookkeeping, never copied from a ReplicaSet
ANNOTATIONS_TO_SKIP = frozenset({
    "kubectl.kubernetes.io/last-applied-configuration", REVISION, "deployment.kubernetes.io/revision-history",
    "deployment.kubernetes.io/desired-replicas", "deployment.kubernetes.io/max-replicas",
    "deprecated.deployment.rollback.to"})
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class RolloutFailed(RunbookError):
    """A Deployment's rollout did not complete (progress deadline exceeded, or the wait timed out)."""


class ServiceSwitchRefused(RunbookError):
    """The other colour is missing, scaled to zero, not fully available or unhealthy; nothing was switched."""


# -- what a Deployment looks like -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentState:
    """One Deployment as recorded: enough to report it and to put its pod template back."""

    namespace: str
    name: str
    revision: int
    generation: int
    observed_generation: int
    replicas: int
    updated: int
    ready: int
    available: int
    paused: bool
    images: dict[str, str]
    env: dict[str, dict[str, str]]  # container -> variable -> digest or source (never the value)
    template: dict[str, Any] = field(repr=False)
    annotations: dict[str, str] = field(repr=False)
    uid: str = ""

    @property
    def target(self) -> str:
        return f"{self.namespace}/{self.name}"

    def image_list(self) -> str:
        return ", ".join(f"{c}={i}" for c, i in self.images.items())


def env_digest(template: dict[str, Any]) -> dict[str, dict[str, str]]:
    """container -> variable -> ``sha256:<8 hex>`` of its value, or where it comes from (valueFrom)."""
    result: dict[str, dict[str, str]] = {}
    for container in template.get("spec", {}).get("containers", []):
        variables = {}
        for var in container.get("env") or []:
            if "value" in var:
                variables[var["name"]] = "sha256:" + hashlib.sha256(str(var["value"]).encode()).hexdigest()[:8]
            else:
                source = var.get("valueFrom") or {}
                kind = next(iter(source), "valueFrom")
                ref = source.get(kind) or {}
                variables[var["name"]] = f"{kind}:{ref.get('name', '')}/{ref.get('key', ref.get('fieldPath', ''))}"
        result[container["name"]] = variables
    return result


def state_of(raw: dict[str, Any]) -> DeploymentState:
    """A DeploymentState from the Deployment's JSON."""
    meta, spec, status = raw["metadata"], raw["spec"], raw.get("status") or {}
    annotations = dict(meta.get("annotations") or {})
    template = raw["spec"]["template"]
    return DeploymentState(
        namespace=meta["namespace"], name=meta["name"], revision=int(annotations.get(REVISION, 0) or 0),
        generation=int(meta.get("generation") or 0), observed_generation=int(status.get("observedGeneration") or 0),
        replicas=int(spec.get("replicas", 1)), updated=int(status.get("updatedReplicas") or 0),
        ready=int(status.get("readyReplicas") or 0), available=int(status.get("availableReplicas") or 0),
        paused=bool(spec.get("paused")), images={c["name"]: c.get("image", "") for c in template["spec"]["containers"]},
        env=env_digest(template), template=copy.deepcopy(template), annotations=annotations, uid=meta.get("uid", ""))


def _json(api: ApiClient, obj: Any) -> Any:
    return api.sanitize_for_serialization(obj)


def _api_error(what: str, exc: ApiException) -> RunbookError:
    reason = exc.reason or ""
    if exc.status in (401, 403):
        return ConfigurationError(f"{what}: the cluster refused the credentials (HTTP {exc.status} {reason})")
    if exc.status == 404:
        return ConfigurationError(f"{what}: not found")
    return RunbookError(f"{what}: HTTP {exc.status} {reason}")


# -- pure: what `kubectl rollout undo` would patch ----------------------------------------------------------


@dataclass(frozen=True)
class RollbackPlan:
    """The pod template and annotations a Deployment gets, and what that means in images."""

    namespace: str
    name: str
    from_revision: int
    to_revision: int | None  # None for explicit images
    template: dict[str, Any] = field(repr=False)
    annotations: dict[str, str] = field(repr=False)
    images: dict[str, str]
    unchanged: bool  # the Deployment already runs that template: nothing to do

    @property
    def target(self) -> str:
        return f"{self.namespace}/{self.name}"


def _without_hash(template: dict[str, Any]) -> dict[str, Any]:
    stripped = copy.deepcopy(template)
    labels = stripped.get("metadata", {}).get("labels")
    if labels:
        labels.pop(HASH_LABEL, None)
    return stripped


def rollout_undo_plan(deployment: dict[str, Any], replicasets: list[dict[str, Any]], to_revision: int) -> RollbackPlan:
    """kubectl rollout undo's choice: revision ``to_revision`` (0: the previous one) of the Deployment's own
    ReplicaSets, its template without the hash label, its annotations over the Deployment's bookkeeping."""
    meta = deployment["metadata"]
    if deployment["spec"].get("paused"):
        raise ConfigurationError(f"deployment {meta['namespace']}/{meta['name']} is paused: resume it first "
                                 "(kubectl rollout resume); nothing was changed")
    owned = [rs for rs in replicasets if any(o.get("uid") == meta.get("uid") and o.get("controller", True)
                                             for o in rs["metadata"].get("ownerReferences") or [])]
    by_revision: dict[int, dict[str, Any]] = {}
    for rs in owned:
        text = (rs["metadata"].get("annotations") or {}).get(REVISION)
        if text and text.isdigit():
            by_revision[int(text)] = rs
    current = int((meta.get("annotations") or {}).get(REVISION, 0) or 0)
    if to_revision == 0:
        revisions = sorted(by_revision)
        if len(revisions) < 2:
            raise ConfigurationError(f"deployment {meta['namespace']}/{meta['name']} has no rollout history "
                                     f"(revisions kept: {revisions or 'none'}); nothing was changed")
        chosen = revisions[-2]
    elif to_revision in by_revision:
        chosen = to_revision
    else:
        raise ConfigurationError(f"deployment {meta['namespace']}/{meta['name']} has no revision {to_revision} "
                                 f"(kept: {sorted(by_revision)}); nothing was changed")
    rs = by_revision[chosen]
    template = _without_hash(rs["spec"]["template"])
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k in ANNOTATIONS_TO_SKIP}
    annotations.update({k: v for k, v in (rs["metadata"].get("annotations") or {}).items()
                        if k not in ANNOTATIONS_TO_SKIP})
    return RollbackPlan(namespace=meta["namespace"], name=meta["name"], from_revision=current, to_revision=chosen,
                        template=template, annotations=annotations,
                        images={c["name"]: c.get("image", "") for c in template["spec"]["containers"]},
                        unchanged=_without_hash(deployment["spec"]["template"]) == template)


def images_plan(state: DeploymentState, images: dict[str, str]) -> RollbackPlan:
    """Set the named containers' images (``kubectl set image``); containers not named keep theirs."""
    template = copy.deepcopy(state.template)
    for container in template["spec"]["containers"]:
        if container["name"] in images:
            container["image"] = images[container["name"]]
    new_images = {c["name"]: c.get("image", "") for c in template["spec"]["containers"]}
    return RollbackPlan(namespace=state.namespace, name=state.name, from_revision=state.revision, to_revision=None,
                        template=template, annotations=state.annotations, images=new_images,
                        unchanged=new_images == state.images)


def parse_images(specs: list[str]) -> dict[str, str]:
    """``["api=registry/app:v1.1.0", ...]`` -> {container: image}; bad input is a ConfigurationError."""
    images: dict[str, str] = {}
    for spec in specs:
        container, sep, image = spec.partition("=")
        container, image = container.strip(), image.strip()
        if not sep or not container or not image or any(ch.isspace() for ch in image):
            raise ConfigurationError(f"image {spec!r}: expected CONTAINER=IMAGE, e.g. api=registry/app:v1.1.0")
        if container in images and images[container] != image:
            raise ConfigurationError(f"container {container!r} given two images")
        images[container] = image
    if not images:
        raise ConfigurationError("no images given")
    return images


def rollout_progress(raw: dict[str, Any]) -> tuple[bool, str, bool]:
    """(done, what is happening, deadline exceeded) of a Deployment, as ``kubectl rollout status`` reads it."""
    meta, spec, status = raw["metadata"], raw["spec"], raw.get("status") or {}
    if int(meta.get("generation") or 0) > int(status.get("observedGeneration") or 0):
        return False, "waiting for the deployment spec update to be observed", False
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return False, condition.get("message") or "progress deadline exceeded", True
    desired = int(spec.get("replicas", 1))
    updated = int(status.get("updatedReplicas") or 0)
    replicas = int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    if updated < desired:
        return False, f"{updated} out of {desired} new replicas have been updated", False
    if replicas > updated:
        return False, f"{replicas - updated} old replicas are pending termination", False
    if available < updated:
        return False, f"{available} of {updated} updated replicas are available", False
    return True, f"{available} of {desired} replicas available", False


# -- tasks ------------------------------------------------------------------------------------------------------


@task(retries=2, retry_delay_seconds=[1, 3], cache_policy=NO_CACHE)
def record_deployments(cluster: KubernetesCluster, namespace: str, names: list[str] | None = None,
                       selector: str | None = None) -> list[DeploymentState]:
    """The named Deployments (or those matching a label selector), as they are now."""
    if not names and not selector:
        raise ConfigurationError("give deployment names or a label selector")
    api = cluster.get_client()
    apps = AppsV1Api(api)
    found: list[DeploymentState] = []
    try:
        if selector:
            items = apps.list_namespaced_deployment(namespace, label_selector=selector).items
            found = [state_of(_json(api, d)) for d in items]
            if not found:
                raise ConfigurationError(f"no deployment in {namespace} matches {selector!r}; nothing was changed")
        for name in names or []:
            if any(s.name == name for s in found):
                continue
            try:
                found.append(state_of(_json(api, apps.read_namespaced_deployment(name, namespace))))
            except ApiException as exc:
                if exc.status == 404:
                    raise ConfigurationError(f"deployment {namespace}/{name} does not exist; nothing was "
                                             "changed") from None
                raise _api_error(f"deployment {namespace}/{name}", exc) from None
    except ApiException as exc:
        raise _api_error(f"deployments in {namespace}", exc) from None
    finally:
        api.close()
    for state in found:
        run_logger().info("recorded %s: revision %d, %s, %d/%d available", state.target, state.revision,
                          state.image_list(), state.available, state.replicas)
    return found


@task(retries=2, retry_delay_seconds=[1, 3], cache_policy=NO_CACHE)
def plan_revision_rollback(cluster: KubernetesCluster, state: DeploymentState, to_revision: int) -> RollbackPlan:
    """Which template ``kubectl rollout undo [--to-revision N]`` would put back (reads only)."""
    api = cluster.get_client()
    try:
        apps = AppsV1Api(api)
        deployment = _json(api, apps.read_namespaced_deployment(state.name, state.namespace))
        replicasets = _json(api, apps.list_namespaced_replica_set(state.namespace)).get("items", [])
    except ApiException as exc:
        raise _api_error(f"deployment {state.target}", exc) from None
    finally:
        api.close()
    plan = rollout_undo_plan(deployment, replicasets, to_revision)
    run_logger().info("%s: revision %d -> %d (%s)%s", state.target, plan.from_revision, plan.to_revision,
                      ", ".join(f"{c}={i}" for c, i in plan.images.items()),
                      " - already running it" if plan.unchanged else "")
    return plan


@task(cache_policy=NO_CACHE)
def apply_pod_template(cluster: KubernetesCluster, namespace: str, name: str, template: dict[str, Any],
                       annotations: dict[str, str]) -> int:
    """Replace the Deployment's pod template and annotations (one JSON patch, as kubectl rollout undo);
    returns the Deployment's new generation (the rollout to wait for)."""
    patch = [{"op": "replace", "path": "/spec/template", "value": template},
             {"op": "replace", "path": "/metadata/annotations", "value": annotations}]
    api = cluster.get_client()
    try:
        result = AppsV1Api(api).patch_namespaced_deployment(name, namespace, patch, _content_type=JSON_PATCH)
    except ApiException as exc:
        raise _api_error(f"patching deployment {namespace}/{name}", exc) from None
    finally:
        api.close()
    images = ", ".join(f"{c['name']}={c.get('image', '')}" for c in template["spec"]["containers"])
    run_logger().info("deployment %s/%s: pod template set (%s), generation %d", namespace, name, images,
                      result.metadata.generation)
    return int(result.metadata.generation or 0)


@task(cache_policy=NO_CACHE)
def set_images(cluster: KubernetesCluster, namespace: str, name: str, images: dict[str, str],
               annotations: dict[str, str] | None = None) -> int:
    """Set container images (and add ``annotations``) by strategic merge patch (``kubectl set image``);
    returns the new generation."""
    patch: dict[str, Any] = {
        "spec": {"template": {"spec": {"containers": [{"name": c, "image": i} for c, i in images.items()]}}}}
    if annotations:
        patch["metadata"] = {"annotations": annotations}
    api = cluster.get_client()
    try:
        result = AppsV1Api(api).patch_namespaced_deployment(name, namespace, patch, _content_type=STRATEGIC)
    except ApiException as exc:
        raise _api_error(f"patching deployment {namespace}/{name}", exc) from None
    finally:
        api.close()
    run_logger().info("deployment %s/%s: images set (%s), generation %d", namespace, name,
                      ", ".join(f"{c}={i}" for c, i in images.items()), result.metadata.generation)
    return int(result.metadata.generation or 0)


@dataclass(frozen=True)
class Rollout:
    namespace: str
    name: str
    revision: int
    images: dict[str, str]
    available: int
    replicas: int
    seconds: float
    polls: int


def last_event(core: CoreV1Api, api: ApiClient, namespace: str, name: str) -> str:
    """The newest event of the Deployment, its ReplicaSets or its pods (Warnings first), as one line."""
    try:
        items = _json(api, core.list_namespaced_event(namespace)).get("items", [])
    except ApiException:
        return "(events not readable)"
    mine = [e for e in items if (e.get("involvedObject") or {}).get("name", "") == name
            or (e.get("involvedObject") or {}).get("name", "").startswith(name + "-")]
    if not mine:
        return "(no events)"

    def when(event: dict[str, Any]) -> str:
        return str(event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp") or "")

    warnings = [e for e in mine if e.get("type") == "Warning"]
    event = max(warnings or mine, key=when)
    obj = event.get("involvedObject") or {}
    return f"{event.get('type', '')} {event.get('reason', '')} on {obj.get('kind', '')}/{obj.get('name', '')}: " \
           f"{event.get('message', '')}"


@task(cache_policy=NO_CACHE)
def wait_for_rollout(cluster: KubernetesCluster, namespace: str, name: str, *, timeout_seconds: float = 600,
                     interval_seconds: float = 2) -> Rollout:
    """Poll the Deployment until its rollout completes (``kubectl rollout status``); ProgressDeadlineExceeded
    or the timeout raise RolloutFailed naming the Deployment and its last event."""
    started = time.monotonic()
    polls = 0
    api = cluster.get_client()
    apps, core = AppsV1Api(api), CoreV1Api(api)
    try:
        while True:
            polls += 1
            try:
                raw = _json(api, apps.read_namespaced_deployment(name, namespace))
            except ApiException as exc:
                if exc.status >= 500 or exc.status == 429:  # transient: keep waiting
                    raw = None
                else:
                    raise _api_error(f"deployment {namespace}/{name}", exc) from None
            if raw is not None:
                done, what, deadline = rollout_progress(raw)
                if done:
                    state = state_of(raw)
                    seconds = round(time.monotonic() - started, 2)
                    run_logger().info("deployment %s/%s rolled out: revision %d, %s, %d/%d available, %.1f s",
                                      namespace, name, state.revision, state.image_list(), state.available,
                                      state.replicas, seconds)
                    return Rollout(namespace, name, state.revision, state.images, state.available, state.replicas,
                                   seconds, polls)
                if deadline:
                    raise RolloutFailed(f'deployment "{namespace}/{name}" exceeded its progress deadline '
                                        f"(ProgressDeadlineExceeded: {what}); last event: "
                                        f"{last_event(core, api, namespace, name)}")
            if time.monotonic() - started + interval_seconds > timeout_seconds:
                raise RolloutFailed(f'deployment "{namespace}/{name}" not rolled out after {timeout_seconds:.0f} s '
                                    f"({what if raw is not None else 'API unavailable'}); last event: "
                                    f"{last_event(core, api, namespace, name)}")
            time.sleep(interval_seconds)
    finally:
        api.close()


# -- blue-green: a Service's selector ------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceState:
    namespace: str
    name: str
    selector: dict[str, str]
    ports: list[int]


@task(retries=2, retry_delay_seconds=[1, 3], cache_policy=NO_CACHE)
def read_service(cluster: KubernetesCluster, namespace: str, name: str) -> ServiceState:
    """A Service's selector and ports."""
    api = cluster.get_client()
    try:
        raw = _json(api, CoreV1Api(api).read_namespaced_service(name, namespace))
    except ApiException as exc:
        raise _api_error(f"service {namespace}/{name}", exc) from None
    finally:
        api.close()
    spec = raw.get("spec") or {}
    state = ServiceState(namespace, name, dict(spec.get("selector") or {}),
                         [int(p["port"]) for p in spec.get("ports") or []])
    run_logger().info("service %s/%s selects %s", namespace, name, state.selector)
    return state


@task(retries=2, retry_delay_seconds=[1, 3], cache_policy=NO_CACHE)
def find_colour_deployment(cluster: KubernetesCluster, namespace: str, selector: dict[str, str]) -> DeploymentState:
    """The one Deployment whose pods the selector would pick; refuses when there is none or several."""
    api = cluster.get_client()
    try:
        items = _json(api, AppsV1Api(api).list_namespaced_deployment(namespace)).get("items", [])
    except ApiException as exc:
        raise _api_error(f"deployments in {namespace}", exc) from None
    finally:
        api.close()
    matches = [d for d in items if all(((d["spec"]["template"].get("metadata") or {}).get("labels") or {}).get(k) == v
                                       for k, v in selector.items())]
    wanted = ",".join(f"{k}={v}" for k, v in selector.items())
    if not matches:
        raise ServiceSwitchRefused(f"no deployment in {namespace} has pods labelled {wanted}; nothing was switched")
    if len(matches) > 1:
        names = sorted(d["metadata"]["name"] for d in matches)
        raise ServiceSwitchRefused(f"several deployments in {namespace} have pods labelled {wanted} ({names}); "
                                   "nothing was switched")
    state = state_of(matches[0])
    run_logger().info("pods labelled %s belong to %s (%d/%d available)", wanted, state.target, state.available,
                      state.replicas)
    return state


def fully_available(state: DeploymentState) -> str | None:
    """Why a Deployment cannot take all traffic now, or None when it can."""
    if state.replicas == 0:
        return f"deployment {state.target} is scaled to zero"
    if state.observed_generation < state.generation:
        return f"deployment {state.target} has a spec change not yet observed"
    if state.updated < state.replicas or state.available < state.replicas:
        return (f"deployment {state.target} is not fully available ({state.available} of {state.replicas} "
                f"available, {state.updated} updated)")
    return None


@dataclass(frozen=True)
class ProxyHealth:
    healthy: bool
    status: int
    attempts: int
    detail: str


@task(cache_policy=NO_CACHE)
def check_service_health(cluster: KubernetesCluster, namespace: str, service: str, port: int | None, path: str, *,
                         attempts: int = 3, interval_seconds: float = 1) -> ProxyHealth:
    """GET ``path`` on a Service through the API server's service proxy (no port-forward); 2xx is healthy."""
    api = cluster.get_client()
    core = CoreV1Api(api)
    target = f"{service}:{port}" if port else service
    status, detail = 0, ""
    try:
        for attempt in range(1, attempts + 1):
            try:
                response = core.connect_get_namespaced_service_proxy_with_path(
                    target, namespace, path.lstrip("/"), _preload_content=False)  # the raw urllib3 response
                status = int(response.status)
                detail = bytes(response.data or b"")[:200].decode(errors="replace")
            except ApiException as exc:
                status, detail = int(exc.status or 0), str(exc.reason or "")
            if 200 <= status < 300:
                run_logger().info("service %s/%s%s healthy (HTTP %d) through the API proxy", namespace, service,
                                  path, status)
                return ProxyHealth(True, status, attempt, detail)
            if attempt < attempts:
                time.sleep(interval_seconds)
    finally:
        api.close()
    run_logger().warning("service %s/%s%s unhealthy through the API proxy: HTTP %d", namespace, service, path, status)
    return ProxyHealth(False, status, attempts, detail)


@task(cache_policy=NO_CACHE)
def set_service_selector(cluster: KubernetesCluster, namespace: str, name: str, selector: dict[str, str]) -> None:
    """Point the Service at the pods ``selector`` picks (a strategic merge patch of spec.selector)."""
    api = cluster.get_client()
    try:
        CoreV1Api(api).patch_namespaced_service(name, namespace, {"spec": {"selector": selector}},
                                                _content_type=STRATEGIC)
    except ApiException as exc:
        raise _api_error(f"patching service {namespace}/{name}", exc) from None
    finally:
        api.close()
    run_logger().info("service %s/%s now selects %s", namespace, name, selector)
