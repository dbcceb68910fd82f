"""A Kubernetes API server double at the HTTP level, for driving the real `kubernetes` client without a cluster.

It serves the slice of the API the rollback runbook uses, as JSON on 127.0.0.1 with bearer-token auth:
apps/v1 Deployments (get, list by label selector, create, patch as JSON patch / merge patch / strategic
merge patch, the scale subresource), ReplicaSets, core/v1 Services (get, create, patch), Pods, Events, and
the service proxy (``/api/v1/namespaces/NS/services/NAME[:PORT]/proxy/PATH``, forwarded to a backend URL
the test registers, as the API server forwards to the Service's endpoints).

A simulated deployment controller runs on every GET of a Deployment (a poll): a spec change is observed on
the next poll, the new ReplicaSet (an existing one with the same template is reused and gets the next
revision, as the real controller does) grows by one replica per poll while the old ones shrink, and the
rollout completes when every replica is updated and available. A container image whose tag is ``broken``
never becomes available: the pod waits in ImagePullBackOff with a Warning event, and once
``spec.progressDeadlineSeconds`` (wall clock) pass without progress the Progressing condition turns False
with reason ProgressDeadlineExceeded.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import threading
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REVISION = "deployment.kubernetes.io/revision"
HASH_LABEL = "pod-template-hash"
_SKIP_TO_RS = {
    "kubectl.kubernetes.io/last-applied-configuration", REVISION, "deployment.kubernetes.io/revision-history",
    "deployment.kubernetes.io/desired-replicas", "deployment.kubernetes.io/max-replicas",
    "deprecated.deployment.rollback.to"}
# strategic merge patch: lists merged by a key (the patchMergeKey of the Kubernetes types we touch)
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "ports": "containerPort",
               "volumes": "name", "volumeMounts": "mountPath", "imagePullSecrets": "name"}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def template_hash(template: dict[str, Any]) -> str:
    stripped = copy.deepcopy(template)
    stripped.get("metadata", {}).get("labels", {}).pop(HASH_LABEL, None)
    return hashlib.sha256(json.dumps(stripped, sort_keys=True).encode()).hexdigest()[:10]


def selector_matches(selector: str | dict[str, str] | None, labels: dict[str, str]) -> bool:
    """Equality-based label selectors (``a=b,c=d``, ``a==b``, ``a!=b``) or a matchLabels mapping."""
    if not selector:
        return True
    if isinstance(selector, dict):
        return all(labels.get(k) == v for k, v in selector.items())
    for term in selector.split(","):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        else:
            key, value = re.split(r"==?", term, maxsplit=1)
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any, key: str = "") -> Any:
    if isinstance(patch, list) and key in _MERGE_KEYS and isinstance(target, list):
        merge_key = _MERGE_KEYS[key]
        result = copy.deepcopy(target)
        for item in patch:
            match = next((i for i, old in enumerate(result) if old.get(merge_key) == item.get(merge_key)), None)
            if item.get("$patch") == "delete":
                if match is not None:
                    result.pop(match)
            elif match is None:
                result.append(copy.deepcopy(item))
            else:
                result[match] = strategic_merge_patch(result[match], item)
        return result
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = strategic_merge_patch(result.get(name), value, name)
    return result


def json_patch(target: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add / replace / remove / test (what kubectl rollout undo sends)."""
    result = copy.deepcopy(target)
    for op in operations:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent: Any = result
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last = parts[-1]
        if op["op"] in ("add", "replace"):
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                if op["op"] == "add":
                    parent.insert(index, copy.deepcopy(op["value"]))
                else:
                    parent[index] = copy.deepcopy(op["value"])
            else:
                if op["op"] == "replace" and last not in parent:
                    raise KeyError(f"replace of missing path {op['path']}")
                parent[last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif op["op"] == "test":
            value = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if value != op["value"]:
                raise ValueError(f"test failed at {op['path']}")
        else:
            raise ValueError(f"unsupported op {op['op']}")
    return result


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class KubeDouble:
    """The API server double; ``with KubeDouble() as kube:`` serves it on a free loopback port."""

    def __init__(self, token: str = "double-token-" + uuid.uuid4().hex) -> None:
        self.token = token
        self.lock = threading.RLock()
        self.deployments: dict[tuple[str, str], dict[str, Any]] = {}
        self.replicasets: dict[tuple[str, str], dict[str, Any]] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.backends: dict[tuple[str, str], str] = {}  # (namespace, service) -> base URL for the proxy
        self.requests: list[tuple[str, str, str, Any]] = []  # method, path, content type, body
        self.unauthorized = 0
        # fault injection: (kind, name) -> HTTP codes the next PATCHes of that object answer, one each (0: pass)
        self.fail_patches: dict[tuple[str, str], list[int]] = {}
        self._rollout_started: dict[tuple[str, str], float] = {}
        self._counter = itertools.count(1)
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if self.headers.get("Authorization") != f"Bearer {double.token}":
                    double.unauthorized += 1
                    return self._send(401, _status(401, "Unauthorized", "Unauthorized"))
                url = urlsplit(self.path)
                url = url._replace(path=unquote(url.path))
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                content_type = (self.headers.get("Content-Type") or "").split(";")[0]
                try:
                    body = json.loads(raw) if raw and "yaml" not in content_type else None
                except ValueError:
                    return self._send(400, _status(400, "BadRequest", "body is not JSON"))
                with double.lock:
                    double.requests.append((method, url.path, content_type, body))
                try:
                    proxied = double.proxy(method, url.path, url.query, raw)
                    if proxied is not None:
                        return self._send(proxied[0], proxied[1], proxied[2])
                    with double.lock:
                        result = double.route(method, url.path, query, content_type, body)
                    self._send(200 if method != "POST" else 201, result)
                except ApiError as exc:
                    self._send(exc.code, _status(exc.code, exc.reason, exc.message))
                except Exception as exc:  # noqa: BLE001 - a bug in the double answers 500, as a server would
                    self._send(500, _status(500, "InternalError", f"{type(exc).__name__}: {exc}"))

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_PATCH(self) -> None:  # noqa: N802
                self._handle("PATCH")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._handle("PUT")

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> KubeDouble:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, namespace: str = "default") -> str:
        """A kubeconfig for this server, its token as the user's credential (what a Block holds)."""
        return yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "runbooks", "user": {"token": self.token}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "runbooks",
                                                        "namespace": namespace}}],
        })

    def patches(self, kind: str = "deployments") -> list[tuple[str, str, Any]]:
        """(path, content type, body) of every PATCH/PUT/POST to that kind."""
        return [(p, ct, b) for m, p, ct, b in self.requests if m in ("PATCH", "PUT", "POST") and f"/{kind}" in p]

    # -- routing --------------------------------------------------------------------------------------------

    def route(self, method: str, path: str, query: dict[str, str], content_type: str, body: Any) -> Any:
        if method == "PATCH":
            m = re.search(r"/(deployments|services)/([^/]+)$", path)
            codes = self.fail_patches.get((m.group(1), m.group(2))) if m else None
            code = codes.pop(0) if codes else 0
            if code:  # 0 lets that PATCH through
                raise ApiError(code, "InternalError" if code >= 500 else "Invalid", f"injected fault {code}")
        m = re.fullmatch(r"/apis/apps/v1/namespaces/([^/]+)/(deployments|replicasets)(?:/([^/]+))?(/scale)?", path)
        if m:
            ns, kind, name, scale = m.groups()
            if kind == "replicasets":
                if name or method != "GET":
                    raise ApiError(405, "MethodNotAllowed", "the double lists replicasets only")
                return _list("ReplicaSetList", "apps/v1", [rs for (n, _), rs in sorted(self.replicasets.items())
                                                            if n == ns and selector_matches(
                                                                query.get("labelSelector"),
                                                                rs["metadata"].get("labels", {}))])
            if name is None:
                if method == "POST":
                    return self.create_deployment(ns, body)
                return _list("DeploymentList", "apps/v1", [
                    self.tick(ns, d["metadata"]["name"]) for (n, _), d in sorted(self.deployments.items())
                    if n == ns and selector_matches(query.get("labelSelector"), d["metadata"].get("labels", {}))])
            if (ns, name) not in self.deployments:
                raise ApiError(404, "NotFound", f'deployments.apps "{name}" not found')
            if scale:
                return self.scale(ns, name, method, content_type, body)
            if method == "GET":
                return self.tick(ns, name)
            if method == "PATCH":
                return self.patch_deployment(ns, name, content_type, body)
            raise ApiError(405, "MethodNotAllowed", method)
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/(services|pods|events)(?:/([^/]+))?", path)
        if m:
            ns, kind, name = m.groups()
            if kind == "events":
                return _list("EventList", "v1", [e for e in self.events if e["metadata"]["namespace"] == ns])
            if kind == "pods":
                return _list("PodList", "v1", [p for (n, _), p in sorted(self.pods.items()) if n == ns
                                               and selector_matches(query.get("labelSelector"),
                                                                    p["metadata"].get("labels", {}))])
            if name is None and method == "POST":
                return self.create_service(ns, body)
            if name is None:
                return _list("ServiceList", "v1", [s for (n, _), s in sorted(self.services.items()) if n == ns])
            if (ns, name) not in self.services:
                raise ApiError(404, "NotFound", f'services "{name}" not found')
            if method == "PATCH":
                service = self.services[(ns, name)]
                self.services[(ns, name)] = _apply_patch(service, content_type, body)
                self.services[(ns, name)]["metadata"]["resourceVersion"] = str(next(self._counter))
            return self.services[(ns, name)]
        raise ApiError(404, "NotFound", f"the double does not serve {path}")

    def proxy(self, method: str, path: str, query: str, raw: bytes) -> tuple[int, bytes, str] | None:
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/services/([^/:]+)(?::[^/]*)?/proxy(/.*)?", path)
        if not m:
            return None
        ns, name, rest = m.groups()
        with self.lock:
            if (ns, name) not in self.services:
                raise ApiError(404, "NotFound", f'services "{name}" not found')
            backend = self.backends.get((ns, name))
        if backend is None:
            raise ApiError(503, "ServiceUnavailable", f'no endpoints available for service "{name}"')
        request = urllib.request.Request(backend + (rest or "/") + (f"?{query}" if query else ""),
                                         data=raw or None, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read(), response.headers.get("Content-Type", "text/plain")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.headers.get("Content-Type", "text/plain")
        except OSError:
            raise ApiError(503, "ServiceUnavailable", f"error trying to reach service {name}") from None

    # -- objects --------------------------------------------------------------------------------------------

    def _meta(self, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        meta = body.setdefault("metadata", {})
        meta.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=now(),
                    resourceVersion=str(next(self._counter)))
        meta.setdefault("annotations", {})
        meta.setdefault("labels", {})
        return meta

    def create_deployment(self, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(body)
        meta = self._meta(ns, body)
        if (ns, meta["name"]) in self.deployments:
            raise ApiError(409, "AlreadyExists", f'deployments.apps "{meta["name"]}" already exists')
        body.update(apiVersion="apps/v1", kind="Deployment")
        meta["generation"] = 1
        spec = body["spec"]
        spec.setdefault("replicas", 1)
        spec.setdefault("progressDeadlineSeconds", 600)
        spec.setdefault("revisionHistoryLimit", 10)
        body["status"] = {"observedGeneration": 0, "replicas": 0}
        self.deployments[(ns, meta["name"])] = body
        self._new_template(ns, body)
        return body

    def create_service(self, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(body)
        meta = self._meta(ns, body)
        body.update(apiVersion="v1", kind="Service")
        self.services[(ns, meta["name"])] = body
        return body

    def owned_replicasets(self, ns: str, deployment: dict[str, Any]) -> list[dict[str, Any]]:
        uid = deployment["metadata"]["uid"]
        return [rs for (n, _), rs in self.replicasets.items() if n == ns
                and any(o.get("uid") == uid for o in rs["metadata"].get("ownerReferences", []))]

    def _new_template(self, ns: str, deployment: dict[str, Any]) -> None:
        """The controller's reaction to a changed pod template: reuse or create the ReplicaSet, next revision."""
        owned = self.owned_replicasets(ns, deployment)
        revision = 1 + max((int(rs["metadata"]["annotations"].get(REVISION, 0)) for rs in owned), default=0)
        template = deployment["spec"]["template"]
        digest = template_hash(template)
        rs = next((r for r in owned if template_hash(r["spec"]["template"]) == digest), None)
        annotations = {k: v for k, v in deployment["metadata"]["annotations"].items() if k not in _SKIP_TO_RS}
        if rs is None:
            name = f"{deployment['metadata']['name']}-{digest[:8]}"
            rs_template = copy.deepcopy(template)
            rs_template.setdefault("metadata", {}).setdefault("labels", {})[HASH_LABEL] = digest[:8]
            selector = copy.deepcopy(deployment["spec"]["selector"])
            selector.setdefault("matchLabels", {})[HASH_LABEL] = digest[:8]
            rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet",
                  "metadata": {"name": name, "labels": dict(rs_template["metadata"]["labels"]),
                               "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "controller": True,
                                                    "name": deployment["metadata"]["name"],
                                                    "uid": deployment["metadata"]["uid"]}]},
                  "spec": {"replicas": 0, "selector": selector, "template": rs_template},
                  "status": {"replicas": 0, "readyReplicas": 0, "availableReplicas": 0}}
            self._meta(ns, rs)
            self.replicasets[(ns, name)] = rs
            self._event(ns, "Deployment", deployment["metadata"]["name"], "Normal", "ScalingReplicaSet",
                        f"Created new replica set {name!r}")
        rs["metadata"]["annotations"] = {**annotations, REVISION: str(revision)}
        deployment["metadata"]["annotations"][REVISION] = str(revision)
        self._rollout_started[(ns, deployment["metadata"]["name"])] = _monotonic()

    def patch_deployment(self, ns: str, name: str, content_type: str, body: Any) -> dict[str, Any]:
        deployment = self.deployments[(ns, name)]
        patched = _apply_patch(deployment, content_type, body)
        for key in ("uid", "name", "namespace", "creationTimestamp", "generation"):
            patched["metadata"][key] = deployment["metadata"][key]
        patched["status"] = deployment["status"]
        patched["metadata"].setdefault("annotations", {})
        if patched["spec"] != deployment["spec"]:
            patched["metadata"]["generation"] += 1
        patched["metadata"]["resourceVersion"] = str(next(self._counter))
        self.deployments[(ns, name)] = patched
        if template_hash(patched["spec"]["template"]) != template_hash(deployment["spec"]["template"]):
            self._new_template(ns, patched)
        return patched

    def scale(self, ns: str, name: str, method: str, content_type: str, body: Any) -> dict[str, Any]:
        deployment = self.deployments[(ns, name)]
        if method in ("PATCH", "PUT"):
            current = {"spec": {"replicas": deployment["spec"]["replicas"]}}
            new = _apply_patch(current, content_type, body) if method == "PATCH" else body
            replicas = int(new["spec"]["replicas"])
            if replicas != deployment["spec"]["replicas"]:
                deployment["spec"]["replicas"] = replicas
                deployment["metadata"]["generation"] += 1
                self._rollout_started[(ns, name)] = _monotonic()
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": name, "namespace": ns, "uid": deployment["metadata"]["uid"]},
                "spec": {"replicas": deployment["spec"]["replicas"]},
                "status": {"replicas": deployment["status"].get("replicas", 0),
                           "selector": ",".join(f"{k}={v}" for k, v in
                                                deployment["spec"]["selector"].get("matchLabels", {}).items())}}

    def _event(self, ns: str, kind: str, name: str, type_: str, reason: str, message: str) -> None:
        stamp = now()
        self.events.append({"apiVersion": "v1", "kind": "Event",
                            "metadata": {"name": f"{name}.{next(self._counter)}", "namespace": ns},
                            "involvedObject": {"kind": kind, "name": name, "namespace": ns},
                            "type": type_, "reason": reason, "message": message, "count": 1,
                            "firstTimestamp": stamp, "lastTimestamp": stamp})

    # -- the simulated controller ---------------------------------------------------------------------------

    def tick(self, ns: str, name: str) -> dict[str, Any]:
        """One controller step for a Deployment (run on every read of it); returns the Deployment."""
        deployment = self.deployments[(ns, name)]
        status = deployment["status"]
        spec = deployment["spec"]
        desired = spec["replicas"]
        new_rs = self._new_rs(ns, deployment)
        old = [rs for rs in self.owned_replicasets(ns, deployment) if rs is not new_rs]
        broken = any(c.get("image", "").endswith(":broken") for c in new_rs["spec"]["template"]["spec"]["containers"])
        progressed = False
        target_new = min(desired, 1) if broken else min(desired, new_rs["spec"]["replicas"] + 1)
        if status.get("observedGeneration", 0) < deployment["metadata"]["generation"]:
            # this sync observes the new spec and reports the ReplicaSets as they are; scaling starts next poll
            status["observedGeneration"] = deployment["metadata"]["generation"]
            self._condition(deployment, "Progressing", "True", "ReplicaSetUpdated",
                            f'ReplicaSet "{new_rs["metadata"]["name"]}" is progressing.')
            target_new = min(new_rs["spec"]["replicas"], desired)
        if new_rs["spec"]["replicas"] != target_new:
            new_rs["spec"]["replicas"] = target_new
            progressed = True
        budget = max(0, desired - (0 if broken else target_new))  # old replicas still needed for availability
        for rs in sorted(old, key=lambda r: -int(r["metadata"]["annotations"].get(REVISION, 0))):
            keep = min(rs["spec"]["replicas"], budget)
            budget -= keep
            if keep != rs["spec"]["replicas"]:
                rs["spec"]["replicas"] = keep
                progressed = True
        for rs in [new_rs, *old]:
            available = 0 if rs is new_rs and broken else rs["spec"]["replicas"]
            rs["status"] = {"replicas": rs["spec"]["replicas"], "readyReplicas": available,
                            "availableReplicas": available, "observedGeneration": 1}
        self._sync_pods(ns, deployment, new_rs, old, broken)
        total = sum(rs["spec"]["replicas"] for rs in [new_rs, *old])
        available = sum(rs["status"]["availableReplicas"] for rs in [new_rs, *old])
        status.update(replicas=total, updatedReplicas=new_rs["spec"]["replicas"], readyReplicas=available,
                      availableReplicas=available, unavailableReplicas=max(0, total - available))
        self._condition(deployment, "Available", "True" if available >= desired else "False",
                        "MinimumReplicasAvailable" if available >= desired else "MinimumReplicasUnavailable",
                        "Deployment has minimum availability." if available >= desired
                        else "Deployment does not have minimum availability.")
        key = (ns, name)
        if progressed:
            self._rollout_started[key] = _monotonic()
        complete = new_rs["spec"]["replicas"] == desired and available >= desired and total == desired
        if complete:
            self._condition(deployment, "Progressing", "True", "NewReplicaSetAvailable",
                            f'ReplicaSet "{new_rs["metadata"]["name"]}" has successfully progressed.')
        elif _monotonic() - self._rollout_started.get(key, _monotonic()) > spec["progressDeadlineSeconds"]:
            self._condition(deployment, "Progressing", "False", "ProgressDeadlineExceeded",
                            f'ReplicaSet "{new_rs["metadata"]["name"]}" has timed out progressing.')
        return deployment

    def _new_rs(self, ns: str, deployment: dict[str, Any]) -> dict[str, Any]:
        digest = template_hash(deployment["spec"]["template"])
        return next(rs for rs in self.owned_replicasets(ns, deployment)
                    if template_hash(rs["spec"]["template"]) == digest)

    def _sync_pods(self, ns: str, deployment: dict[str, Any], new_rs: dict[str, Any], old: list[dict[str, Any]],
                   broken: bool) -> None:
        for rs in [new_rs, *old]:
            rs_name = rs["metadata"]["name"]
            mine = sorted(k for k, p in self.pods.items() if k[0] == ns and p["metadata"]["labels"].get(
                HASH_LABEL) == rs["spec"]["template"]["metadata"]["labels"][HASH_LABEL])
            for key in mine[rs["spec"]["replicas"]:]:
                del self.pods[key]
            for i in range(len(mine), rs["spec"]["replicas"]):
                pod_name = f"{rs_name}-{uuid.uuid4().hex[:5]}"
                failing = broken and rs is new_rs
                containers = rs["spec"]["template"]["spec"]["containers"]
                self.pods[(ns, pod_name)] = {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod_name, "namespace": ns, "uid": str(uuid.uuid4()),
                                 "labels": dict(rs["spec"]["template"]["metadata"]["labels"]),
                                 "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                      "name": rs_name, "uid": rs["metadata"]["uid"]}]},
                    "spec": copy.deepcopy(rs["spec"]["template"]["spec"]),
                    "status": {"phase": "Pending" if failing else "Running", "podIP": f"10.0.0.{len(self.pods) + i}",
                               "containerStatuses": [
                                   {"name": c["name"], "image": c["image"], "imageID": "", "ready": not failing,
                                    "restartCount": 0,
                                    "state": {"waiting": {"reason": "ImagePullBackOff"}} if failing
                                    else {"running": {"startedAt": now()}}} for c in containers]}}
                if failing:
                    image = next(c["image"] for c in containers if c["image"].endswith(":broken"))
                    self._event(ns, "Pod", pod_name, "Warning", "Failed",
                                f'Failed to pull image "{image}": manifest unknown')

    @staticmethod
    def _condition(deployment: dict[str, Any], type_: str, status: str, reason: str, message: str) -> None:
        conditions = deployment["status"].setdefault("conditions", [])
        stamp = now()
        for condition in conditions:
            if condition["type"] == type_:
                if condition["reason"] != reason:
                    condition.update(lastTransitionTime=stamp)
                condition.update(status=status, reason=reason, message=message, lastUpdateTime=stamp)
                return
        conditions.append({"type": type_, "status": status, "reason": reason, "message": message,
                           "lastUpdateTime": stamp, "lastTransitionTime": stamp})


def _monotonic() -> float:
    import time

    return time.monotonic()


def _apply_patch(obj: dict[str, Any], content_type: str, body: Any) -> dict[str, Any]:
    if content_type == "application/json-patch+json":
        try:
            return json_patch(obj, body)
        except (KeyError, IndexError, ValueError) as exc:
            raise ApiError(422, "Invalid", f"json patch: {exc}") from None
    if content_type == "application/merge-patch+json":
        return merge_patch(obj, body)
    if content_type == "application/strategic-merge-patch+json":
        return strategic_merge_patch(obj, body)
    raise ApiError(415, "UnsupportedMediaType", f"the double does not take {content_type!r} patches")


def _list(kind: str, api_version: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items}


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
