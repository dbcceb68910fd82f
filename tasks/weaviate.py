"""Weaviate steps: a backup through Weaviate's own backup API, which is asynchronous (started, then
polled until SUCCESS or FAILED), object counts per collection, and the restore into a Weaviate that
lacks those collections.

Weaviate writes the backup itself, to the backend module it has enabled (``backup-s3`` or
``backup-filesystem``); the set holds a small descriptor of it (``backups/<set>/weaviate/weaviate.json.zst``)
with the counts taken just before. With the ``s3`` backend and an S3 store, Weaviate writes into the
set's own prefix (``backups/<set>/weaviate/``), so retention removes the two together.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.errors import (
    ConfigurationError,
    ConnectionFailed,
    DumpFailed,
    PreflightFailed,
    RestoreFailed,
    RunbookError,
    VerificationFailed,
)
from blocks.store import BackupStore
from blocks.weaviate import WeaviateConnection
from tasks.log import run_logger
from tasks.manifest import Part, WeaviateSummary, part_key, set_prefix
from tasks.retry import retry_transient
from tasks.stream import StreamResult, open_compressed_writer

_DONE = {"SUCCESS", "FAILED", "CANCELED"}


class WeaviateRefused(RunbookError):
    """Weaviate answered a request with an error status; the message carries Weaviate's own words."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _call(conn: WeaviateConnection, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One request; errors name the server and Weaviate's message, never the API key."""
    where = conn.describe()
    try:
        with conn.get_client() as client:
            response = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        raise ConnectionFailed(f"cannot reach Weaviate {where}: {type(exc).__name__}: {exc}") from None
    if response.status_code in (401, 403):
        raise ConnectionFailed(f"Weaviate {where} refused {method} {path} ({response.status_code}): check the "
                               "API key of the WeaviateConnection block")
    if not response.is_success:
        raise WeaviateRefused(f"Weaviate {where} answered {method} {path} with {response.status_code}: "
                              f"{_error_text(response)}", response.status_code)
    return response.json() if response.content else {}


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    errors = body.get("error") if isinstance(body, dict) else None
    if isinstance(errors, list):
        return "; ".join(str(e.get("message", e)) for e in errors)[:500]
    return json.dumps(body)[:300]


def list_collections(conn: WeaviateConnection) -> list[str]:
    return sorted(c["class"] for c in _call(conn, "GET", "/v1/schema").get("classes") or [])


def count_objects(conn: WeaviateConnection, collections: list[str]) -> dict[str, int]:
    """Objects per collection, from the aggregate API (one GraphQL query)."""
    if not collections:
        return {}
    query = "{ Aggregate { " + " ".join(f"{c} {{ meta {{ count }} }}" for c in collections) + " } }"
    answer = _call(conn, "POST", "/v1/graphql", {"query": query})
    if answer.get("errors"):
        raise WeaviateRefused(f"Weaviate {conn.describe()} could not count objects: "
                              f"{answer['errors'][0].get('message')}", 200)
    data = answer.get("data", {}).get("Aggregate", {})
    return {c: int((data.get(c) or [{}])[0].get("meta", {}).get("count", 0)) for c in collections}


def backup_id_for(set_id: str) -> str:
    """Weaviate backup ids are lower case letters, digits, '_' and '-'."""
    return f"runbooks-{set_id.lower()}"


def _location(conn: WeaviateConnection, store: BackupStore, set_id: str) -> tuple[dict[str, str], str | None]:
    """The backup's ``config`` (bucket, path) and, when it lands in the set's prefix, that key prefix."""
    if conn.backend != "s3":
        return {}, None
    if store.backend == "s3" and store.bucket:
        inside = f"{set_prefix(set_id)}weaviate/"
        path = "/".join(p for p in (store.prefix.strip("/"), inside.rstrip("/")) if p)
        return {"bucket": store.bucket, "path": path}, inside
    config = {k: v for k, v in (("bucket", conn.s3_bucket), ("path", conn.s3_path)) if v}
    return config, None


def _wait(conn: WeaviateConnection, path: str, what: str, timeout: float, poll: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        answer = _call(conn, "GET", path)
        status = str(answer.get("status", ""))
        if status != last:
            run_logger().info("Weaviate %s %s: %s", conn.describe(), what, status)
            last = status
        if status in _DONE:
            return answer
        if time.monotonic() + poll > deadline:
            raise RunbookError(f"Weaviate {conn.describe()} {what} still {status} after {timeout:.0f} s")
        time.sleep(poll)


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def snapshot_weaviate(conn: WeaviateConnection, store: BackupStore, set_id: str, *,
                      collections: list[str] | None = None, timeout: float = 3600, poll: float = 2.0) -> Part:
    """Start a Weaviate backup of ``collections`` (default: all), wait for SUCCESS, and store its descriptor
    with the object counts taken just before. A FAILED backup fails the step with Weaviate's error."""
    where = conn.describe()
    present = list_collections(conn)
    chosen = sorted(collections or present)
    missing = sorted(set(chosen) - set(present))
    if missing:
        raise ConfigurationError(f"Weaviate {where} has no collection(s) {missing}; it has {present}")
    counts = count_objects(conn, chosen)
    backup_id = backup_id_for(set_id)
    config, store_prefix = _location(conn, store, set_id)
    run_logger().info("Weaviate %s: backup %s of %s (%d objects) to its %s backend", where, backup_id, chosen,
                      sum(counts.values()), conn.backend)
    body: dict[str, Any] = {"id": backup_id, "include": chosen}
    if config:
        body["config"] = config
    try:
        _call(conn, "POST", f"/v1/backups/{conn.backend}", body)
    except WeaviateRefused as exc:
        raise DumpFailed(f"{exc}; nothing was stored") from None
    answer = _wait(conn, f"/v1/backups/{conn.backend}/{backup_id}", f"backup {backup_id}", timeout, poll)
    if answer.get("status") != "SUCCESS":
        raise DumpFailed(f"Weaviate {where} backup {backup_id} ended {answer.get('status')}: "
                         f"{answer.get('error') or 'no error given'}; the set is not written")
    summary = WeaviateSummary(backend=conn.backend, backup_id=backup_id, collections=chosen, objects=counts,
                              bucket=config.get("bucket"), path=answer.get("path") or config.get("path"),
                              store_prefix=store_prefix)
    key = part_key(set_id, "weaviate")
    results: list[StreamResult] = []
    with open_compressed_writer(store.get_client(), key, threads=0, result=results) as out:
        out.write(summary.model_dump_json(indent=2).encode() + b"\n")
    stored = results[0]
    version = str(_call(conn, "GET", "/v1/meta").get("version", ""))
    return Part(kind="weaviate", name="weaviate", key=key, size=stored.size, raw_size=stored.raw_size,
                sha256=stored.sha256, tool="weaviate backup API", tool_version=version, server_version=version,
                weaviate=summary)


def _summary(part: Part) -> WeaviateSummary:
    if part.kind != "weaviate" or part.weaviate is None:
        raise ConfigurationError(f"part {part.key} is a {part.kind} part without a Weaviate summary")
    return part.weaviate


def _restore_body(summary: WeaviateSummary) -> dict[str, Any]:
    body: dict[str, Any] = {"include": summary.collections}
    config = {k: v for k, v in (("bucket", summary.bucket), ("path", summary.path)) if v}
    if config and summary.backend == "s3":
        body["config"] = config
    return body


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def preflight_weaviate_restore(part: Part, target: WeaviateConnection) -> None:
    """Check, changing nothing, that ``target`` uses the backup's backend, sees the backup as SUCCESS, and
    has none of its collections (Weaviate restores only into collections that do not exist)."""
    summary = _summary(part)
    where = target.describe()
    if target.backend != summary.backend:
        raise PreflightFailed(f"Weaviate {where} uses the {target.backend} backend, the backup was written to "
                              f"{summary.backend}; nothing was changed")
    try:
        status = _call(target, "GET", f"/v1/backups/{summary.backend}/{summary.backup_id}").get("status")
    except WeaviateRefused as exc:
        raise PreflightFailed(f"{exc}: Weaviate {where} cannot see backup {summary.backup_id}; nothing was "
                              "changed") from None
    if status != "SUCCESS":
        raise PreflightFailed(f"Weaviate {where} reports backup {summary.backup_id} as {status}, not SUCCESS; "
                              "nothing was changed")
    clash = sorted(set(summary.collections) & set(list_collections(target)))
    if clash:
        raise PreflightFailed(f"Weaviate {where} already has the collection(s) {clash}: a Weaviate restore only "
                              "creates collections; delete or rename them first; nothing was changed")
    run_logger().info("Weaviate pre-flight of %s passed: backup %s is there, %s are free", where,
                      summary.backup_id, summary.collections)


@dataclass(frozen=True)
class RestoredWeaviate:
    objects: dict[str, int]
    note: str


@task(cache_policy=NO_CACHE)
def restore_weaviate(part: Part, target: WeaviateConnection, *, timeout: float = 3600,
                     poll: float = 2.0) -> RestoredWeaviate:
    """Restore the backup's collections into ``target`` (they must not exist), wait for SUCCESS, and compare
    the object counts with the manifest."""
    summary = _summary(part)
    where = target.describe()
    path = f"/v1/backups/{summary.backend}/{summary.backup_id}/restore"
    try:
        _call(target, "POST", path, _restore_body(summary))
    except WeaviateRefused as exc:
        raise RestoreFailed(str(exc)) from None
    answer = _wait(target, path, f"restore of {summary.backup_id}", timeout, poll)
    if answer.get("status") != "SUCCESS":
        raise RestoreFailed(f"Weaviate {where} restore of {summary.backup_id} ended {answer.get('status')}: "
                            f"{answer.get('error') or 'no error given'}")
    counts = count_objects(target, summary.collections)
    if counts != summary.objects:
        raise VerificationFailed(f"Weaviate {where} holds {counts} objects per collection after the restore, the "
                                 f"backup had {summary.objects}")
    run_logger().info("restored Weaviate backup %s into %s: %s", summary.backup_id, where, counts)
    return RestoredWeaviate(objects=counts, note=f"{sum(counts.values())} objects in {len(counts)} collections "
                                                 "match")


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def drop_collections(target: WeaviateConnection, collections: list[str]) -> list[str]:
    """Delete those of ``collections`` that exist: the undo of a restore into a Weaviate that lacked them."""
    present = set(list_collections(target))
    dropped = [c for c in collections if c in present]
    for collection in dropped:
        _call(target, "DELETE", f"/v1/schema/{collection}")
    if dropped:
        run_logger().info("deleted the restored collections %s from Weaviate %s", dropped, target.describe())
    return dropped


@task(cache_policy=NO_CACHE)
def check_weaviate_backup(part: Part, store: BackupStore, conn: WeaviateConnection | None) -> list[str]:
    """The drill's look at a Weaviate backup it cannot restore: Weaviate reports it SUCCESS (when a
    connection is given), and its files are in the store (when Weaviate wrote into the set's prefix).
    Returns problems; empty means 'stored', never 'verified'."""
    summary = _summary(part)
    problems = []
    if conn is not None:
        try:
            status = _call(conn, "GET", f"/v1/backups/{summary.backend}/{summary.backup_id}").get("status")
        except RunbookError as exc:
            status = f"unknown ({exc})"
        if status != "SUCCESS":
            problems.append(f"Weaviate reports backup {summary.backup_id} as {status}")
    if summary.store_prefix:
        files = f"{summary.store_prefix}{summary.backup_id}/"
        if not store.get_client().list(files):
            problems.append(f"no Weaviate backup files under {files} in the store")
    return problems
