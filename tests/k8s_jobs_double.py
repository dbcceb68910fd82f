"""The Kubernetes API double (tests/k8s_double.py) with batch/v1 Jobs and pod logs, for the migration step.

A Job's single container command runs as a local process (argv as given, environment from the container's
literal ``env`` values, nothing else), so a migration Job really changes the test's PostgreSQL. Its pod
(labelled ``job-name``) is Running while the process runs, then Succeeded or Failed; the Job gets the
``Complete`` or ``Failed`` condition (backoffLimit 0: one pod, no retry); the pod's log is the process's
stdout and stderr.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import threading
import time
import uuid
from typing import Any
from urllib.parse import parse_qs

from tests.k8s_double import ApiError, KubeDouble, now


class JobsDouble(KubeDouble):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.pod_logs: dict[tuple[str, str], str] = {}
        self.job_threads: list[threading.Thread] = []
        self.timeline: list[tuple[float, str, str]] = []  # (time.time(), method, path) of every request
        self.job_finished: dict[tuple[str, str], float] = {}

    def route(self, method: str, path: str, query: dict[str, str], content_type: str, body: Any) -> Any:
        self.timeline.append((time.time(), method, path))
        m = re.fullmatch(r"/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?", path)
        if m:
            ns, name = m.groups()
            if name is None and method == "POST":
                return self.create_job(ns, body)
            if name is not None and method == "GET":
                if (ns, name) not in self.jobs:
                    raise ApiError(404, "NotFound", f'jobs.batch "{name}" not found')
                return self.jobs[(ns, name)]
            raise ApiError(405, "MethodNotAllowed", f"the double does not {method} {path}")
        return super().route(method, path, query, content_type, body)

    def proxy(self, method: str, path: str, query: str, raw: bytes) -> tuple[int, bytes, str] | None:
        """Pod logs answer text/plain, as the API server's do (the base double's hook for non-JSON answers)."""
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", path)
        if not m or method != "GET":
            return super().proxy(method, path, query, raw)
        with self.lock:
            self.timeline.append((time.time(), method, path))
            if m.groups() not in self.pods:
                raise ApiError(404, "NotFound", f'pods "{m.group(2)}" not found')
            data = self.pod_logs.get((m.group(1), m.group(2)), "").encode()
        limit = int((parse_qs(query).get("limitBytes") or ["0"])[0])
        return 200, data[-limit:] if limit else data, "text/plain"

    def create_job(self, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(body)
        name = body["metadata"]["name"]
        if (ns, name) in self.jobs:
            raise ApiError(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
        self._meta(ns, body)
        body.update(apiVersion="batch/v1", kind="Job")
        body["status"] = {"active": 1, "startTime": now()}
        self.jobs[(ns, name)] = body
        pod_name = f"{name}-{uuid.uuid4().hex[:5]}"
        template = body["spec"]["template"]
        [container] = template["spec"]["containers"]
        self.pods[(ns, pod_name)] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": ns, "uid": str(uuid.uuid4()),
                         "labels": {**(template.get("metadata", {}).get("labels") or {}), "job-name": name}},
            "spec": copy.deepcopy(template["spec"]), "status": {"phase": "Running"}}
        thread = threading.Thread(target=self._run, args=(ns, name, pod_name, container), daemon=True)
        self.job_threads.append(thread)
        thread.start()
        return body

    def _run(self, ns: str, name: str, pod_name: str, container: dict[str, Any]) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        env.update({v["name"]: v["value"] for v in container.get("env") or [] if "value" in v})
        try:
            done = subprocess.run(container["command"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=container.get("_timeout", 120), check=False)
            code, output = done.returncode, done.stdout.decode(errors="replace")
        except (OSError, subprocess.TimeoutExpired) as exc:
            code, output = 127, f"{type(exc).__name__}: {exc}\n"
        with self.lock:
            self.pod_logs[(ns, pod_name)] = output
            self.job_finished[(ns, name)] = time.time()
            self.pods[(ns, pod_name)]["status"] = {"phase": "Succeeded" if code == 0 else "Failed"}
            job = self.jobs[(ns, name)]
            stamp = now()
            if code == 0:
                job["status"] = {"succeeded": 1, "completionTime": stamp, "startTime": job["status"]["startTime"],
                                 "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": stamp}]}
            else:
                job["status"] = {"failed": 1, "startTime": job["status"]["startTime"],
                                 "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                 "message": "Job has reached the specified backoff limit",
                                                 "lastTransitionTime": stamp}]}
