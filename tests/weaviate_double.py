"""An HTTP double of Weaviate's schema, aggregate and backup/restore endpoints, for the real httpx client.

Backups and restores take ``polls`` status requests to finish (STARTED, TRANSFERRING, then SUCCESS), or end
FAILED when asked. With the s3 backend and a ``store`` client, a backup writes its files where the request's
``config`` (bucket, path) says, as Weaviate's backup-s3 module does: ``<path>/<backup id>/...``, the path taken
relative to the store's own prefix.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Job:
    collections: dict[str, int]
    polls_left: int
    fail: str | None = None
    status: str = "STARTED"
    path: str = ""


@dataclass
class WeaviateDouble:
    api_key: str | None = None
    polls: int = 3
    collections: dict[str, int] = field(default_factory=dict)
    backups: dict[tuple[str, str], Job] = field(default_factory=dict)
    restores: dict[tuple[str, str], Job] = field(default_factory=dict)
    fail_backup: str | None = None  # the error of the next backup, which then ends FAILED
    fail_restore: str | None = None
    store: Any = None  # a StoreClient the s3 backend writes backup files into
    store_prefix: str = ""
    requests: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)
    unauthorized: int = 0

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> WeaviateDouble:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---------------------------------------------------------------------------------------- behaviour

    def _advance(self, job: Job) -> None:
        if job.status in ("SUCCESS", "FAILED"):
            return
        job.polls_left -= 1
        if job.polls_left > 0:
            job.status = "TRANSFERRING"
        else:
            job.status = "FAILED" if job.fail else "SUCCESS"

    def _write_files(self, backend: str, backup_id: str, config: dict[str, str], job: Job) -> str:
        path = config.get("path") or "weaviate-backups"
        if backend == "s3" and self.store is not None:
            relative = path[len(self.store_prefix):].lstrip("/") if path.startswith(self.store_prefix) else path
            self.store.put_bytes(f"{relative}/{backup_id}/backup_config.json",
                                 json.dumps({"id": backup_id, "classes": job.collections}).encode())
        if backend == "s3":
            return f"s3://{config.get('bucket', 'default')}/{path}/{backup_id}"
        return f"/var/lib/weaviate/backups/{backup_id}"

    def handle(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        self.requests.append((method, path, body))
        if path == "/v1/meta" and method == "GET":
            return 200, {"version": "1.27.0-double"}
        if path == "/v1/schema" and method == "GET":
            return 200, {"classes": [{"class": name} for name in sorted(self.collections)]}
        if (m := re.fullmatch(r"/v1/schema/(\w+)", path)) and method == "DELETE":
            self.collections.pop(m.group(1), None)
            return 200, {}
        if path == "/v1/graphql" and method == "POST":
            names = re.findall(r"(\w+) \{ meta", (body or {}).get("query", ""))
            unknown = [n for n in names if n not in self.collections]
            if unknown:
                return 200, {"errors": [{"message": f"Cannot query field {unknown[0]!r} on type Aggregate"}]}
            counts = {n: [{"meta": {"count": self.collections[n]}}] for n in names}
            return 200, {"data": {"Aggregate": counts}}
        if (m := re.fullmatch(r"/v1/backups/(\w+)", path)) and method == "POST":
            backend, backup_id = m.group(1), (body or {}).get("id", "")
            if (backend, backup_id) in self.backups:
                return 422, {"error": [{"message": f"backup {backup_id!r} already exists"}]}
            include = (body or {}).get("include") or sorted(self.collections)
            job = Job({c: self.collections[c] for c in include}, self.polls, self.fail_backup)
            self.fail_backup = None
            job.path = self._write_files(backend, backup_id, (body or {}).get("config") or {}, job)
            self.backups[(backend, backup_id)] = job
            return 200, {"id": backup_id, "backend": backend, "status": "STARTED", "classes": include}
        if (m := re.fullmatch(r"/v1/backups/(\w+)/([\w-]+)", path)) and method == "GET":
            job = self.backups.get((m.group(1), m.group(2)))
            if job is None:
                return 404, {"error": [{"message": f"backup {m.group(2)!r} not found"}]}
            self._advance(job)
            answer = {"id": m.group(2), "backend": m.group(1), "status": job.status, "path": job.path}
            if job.status == "FAILED":
                answer["error"] = job.fail
            return 200, answer
        if (m := re.fullmatch(r"/v1/backups/(\w+)/([\w-]+)/restore", path)):
            key = (m.group(1), m.group(2))
            backup = self.backups.get(key)
            if backup is None or backup.status != "SUCCESS":
                return 404, {"error": [{"message": f"backup {m.group(2)!r} not found"}]}
            if method == "POST":
                include = (body or {}).get("include") or sorted(backup.collections)
                existing = [c for c in include if c in self.collections]
                if existing:
                    return 422, {"error": [{"message": f"cannot restore class \"{existing[0]}\" because it "
                                                       "already exists"}]}
                self.restores[key] = Job({c: backup.collections[c] for c in include}, self.polls, self.fail_restore)
                self.fail_restore = None
                return 200, {"id": m.group(2), "status": "STARTED"}
            job = self.restores.get(key)
            if job is None:
                return 404, {"error": [{"message": "no restore running"}]}
            before = job.status
            self._advance(job)
            if job.status == "SUCCESS" and before != "SUCCESS":
                self.collections.update(job.collections)
            answer = {"id": m.group(2), "status": job.status}
            if job.status == "FAILED":
                answer["error"] = job.fail
            return 200, answer
        return 404, {"error": [{"message": f"no route {method} {path}"}]}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                if double.api_key and self.headers.get("Authorization") != f"Bearer {double.api_key}":
                    double.unauthorized += 1
                    return self._reply(401, {"error": [{"message": "unauthorized"}]})
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with double.lock:
                    code, answer = double.handle(method, self.path, body)
                self._reply(code, answer)

            def _reply(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._serve("DELETE")

            def log_message(self, *_args: object) -> None:
                pass

        return Handler
