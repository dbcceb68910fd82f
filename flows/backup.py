"""The `backup` runbook: PostgreSQL databases and globals, Redis, directories, streamed into a store.

Parts are written first, each checksummed on the way; the manifest is written last, only when every
part is stored. A failed run discards what it wrote, so it is never listed as a backup.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.runtime import flow_run as current_run
from pydantic import BaseModel

from blocks.errors import ConfigurationError
from blocks.postgres import PostgresConnection
from blocks.redis import RedisConnection
from blocks.store import DEFAULT_STORE, BackupStore
from blocks.weaviate import WeaviateConnection
from flows._form import param
from tasks.approval import refused_at_start
from tasks.files import archive_directory
from tasks.log import run_logger
from tasks.manifest import Manifest, Part, build_manifest, human_size, new_set_id
from tasks.metrics import push_flow_run_metrics
from tasks.notify import notify_hook
from tasks.postgres import dump_database, dump_globals, inspect_server
from tasks.progress import Progress
from tasks.redis import snapshot_redis
from tasks.store import discard_incomplete_set, write_manifest
from tasks.validate import check_database_name, check_local_path, check_tag
from tasks.weaviate import snapshot_weaviate


class BackupResult(BaseModel):
    set_id: str
    store: str
    parts: int
    size: int
    raw_size: int
    seconds: float
    manifest_key: str


def runbooks_version() -> str:
    try:
        return version("prefect-runbooks")
    except PackageNotFoundError:
        return "dev"


@flow(name="backup", on_completion=[push_flow_run_metrics],
      on_failure=[notify_hook("FAILED"), push_flow_run_metrics],
      on_crashed=[notify_hook("CRASHED"), push_flow_run_metrics],
      log_prints=False)
def backup(
    store: Annotated[BackupStore | None, param(
        "Backup store", "Where the backup set is written. Empty: the local directory " + DEFAULT_STORE + ".")] = None,
    postgres: Annotated[PostgresConnection | None, param(
        "PostgreSQL server", "The server whose databases are dumped (pg_dump, read-only). Empty: no PostgreSQL "
        "in the set.")] = None,
    redis: Annotated[RedisConnection | None, param(
        "Redis server", "The Redis whose snapshot (RDB) is taken. Empty: no Redis in the set.")] = None,
    paths: Annotated[list[str] | None, param(
        "Directories", "Directories on this host archived into the set (media, configuration). Empty: "
        "none.")] = None,
    databases: Annotated[list[str] | None, param(
        "Databases", "Database names to dump. Empty: every database that is not a template.")] = None,
    tags: Annotated[list[str] | None, param(
        "Tags", "Labels stored in the manifest (e.g. nightly, before-upgrade); listings and retention show "
        "them. Empty: no tags.")] = None,
    include_globals: Annotated[bool, param(
        "Roles and tablespaces", "Also dump the server's roles and tablespaces (pg_dumpall --globals-only). "
        "On by default: a restore onto a new server then has the owners it needs.")] = True,
    no_role_passwords: Annotated[bool, param(
        "Leave out role passwords", "For managed PostgreSQL where pg_authid cannot be read: roles are dumped "
        "without passwords. Off by default: passwords are kept.")] = False,
    redis_mode: Annotated[Literal["replication", "bgsave"], param(
        "Redis snapshot method", "replication (default): the snapshot is streamed over the replication "
        "protocol, nothing is written on the Redis host. bgsave: BGSAVE, then dump.rdb is read from "
        "redis_rdb_path on this host.")] = "replication",
    redis_rdb_path: Annotated[str | None, param(
        "Redis dump.rdb path", "bgsave mode only: where the server writes dump.rdb. Empty: not used.")] = None,
    weaviate: Annotated[WeaviateConnection | None, param(
        "Weaviate", "A Weaviate backed up through its backup API (waited for until SUCCESS). Empty: no "
        "Weaviate in the set.")] = None,
    weaviate_collections: Annotated[list[str] | None, param(
        "Weaviate collections", "Collections to back up. Empty: all of them.")] = None,
    table_checksums: Annotated[bool, param(
        "Table checksums", "Record a content checksum of every table, so a restore drill can prove the rows "
        "are the same. On by default (reads each table once more).")] = True,
    checksum_max_table_mb: Annotated[int | None, param(
        "Checksum size limit (MB)", "Tables bigger than this get a row count instead of a checksum. Empty: "
        "every table is checksummed.")] = None,
    compression_level: Annotated[int, param(
        "Compression level", "zstd level 1-19 for dumps. 1 (default) keeps up with pg_dump; higher levels "
        "give smaller sets for much more CPU time.", ge=1, le=19)] = 1,
    compression_threads: Annotated[int, param(
        "Compression threads", "zstd worker threads per stream, 0-64. 2 by default; 0 compresses in the "
        "dumping thread.", ge=0, le=64)] = 2,
    retries: Annotated[int, param(
        "Retries per step", "How often each step is retried on a transient error (connection reset, 5xx), "
        "0-10. 2 by default.", ge=0, le=10)] = 2,
    retry_delay_seconds: Annotated[float, param(
        "Retry delay (s)", "Seconds between retries. 10 by default.", ge=0)] = 10,
    notify_block: Annotated[str | None, param(
        "Notify", "A saved notification Block (e.g. slack-webhook/ops) told of a failure. Empty: nobody is "
        "told.")] = None,
) -> BackupResult:
    """Back up the configured sources into one verified, manifest-last backup set."""
    if (refused := refused_at_start()) is not None:  # an alert's approval form said reject
        return refused
    log = run_logger()
    if postgres is None and redis is None and not paths and weaviate is None:
        raise ConfigurationError("nothing to back up: give a postgres connection, a redis connection, paths or a "
                                 "weaviate connection")
    if redis_mode == "bgsave" and redis is not None and not redis_rdb_path:
        raise ConfigurationError("redis_mode=bgsave needs redis_rdb_path (where the server writes dump.rdb)")
    for name in databases or []:
        check_database_name(name)
    for path in [*(paths or []), *([redis_rdb_path] if redis_rdb_path else [])]:
        check_local_path("paths" if path != redis_rdb_path else "redis_rdb_path", path)
    for tag in tags or []:
        check_tag(tag)
    store = store or BackupStore.from_url(DEFAULT_STORE)
    store.get_client()  # configuration errors surface before anything is dumped
    retry = {"retries": retries, "retry_delay_seconds": retry_delay_seconds}
    set_id = new_set_id()
    started_at = datetime.now(UTC)
    started = time.monotonic()
    log.info("backup set %s into %s", set_id, store.describe())

    parts: list[Part] = []
    source: dict[str, str] = {}
    try:
        server = inspect_server.with_options(**retry)(postgres, databases) if postgres else None
        progress = Progress(
            (server.total_bytes if server else 0),
            create_progress_artifact(0.0, key="backup-progress", description=f"Backup {set_id}"),
        )
        if postgres is not None and server is not None:
            source["postgres"] = f"{postgres.describe()} (PostgreSQL {server.version})"
            if include_globals:
                parts.append(dump_globals.with_options(**retry)(
                    postgres, store, set_id, no_role_passwords=no_role_passwords))
            for database in server.databases:
                parts.append(dump_database.with_options(**retry)(
                    postgres, database, store, set_id, table_checksums=table_checksums,
                    checksum_max_table_bytes=checksum_max_table_mb * 2**20 if checksum_max_table_mb else None,
                    level=compression_level, threads=compression_threads, progress=progress,
                ))
        if redis is not None:
            source["redis"] = redis.describe()
            parts.append(snapshot_redis.with_options(**retry)(
                redis, store, set_id, mode=redis_mode, rdb_path=redis_rdb_path))
        for path in paths or []:
            source[f"files:{path}"] = path
            parts.append(archive_directory.with_options(**retry)(path, store, set_id, progress=progress))
        if weaviate is not None:
            source["weaviate"] = weaviate.describe()
            parts.append(snapshot_weaviate.with_options(**retry)(weaviate, store, set_id,
                                                                 collections=weaviate_collections))
        manifest = build_manifest(
            set_id, parts, started_at=started_at, completed_at=datetime.now(UTC), tags=tags or [],
            source=source, runbooks_version=runbooks_version(), flow_run_id=str(current_run.id or ""),
        )
        key = write_manifest(store, manifest)
        progress.finish()
    except BaseException:
        log.error("backup set %s failed; discarding its parts so it is never listed", set_id)
        discard_incomplete_set(store, set_id)
        raise

    seconds = round(time.monotonic() - started, 1)
    _publish_artifacts(manifest, store.describe(), seconds)
    return BackupResult(set_id=set_id, store=store.describe(), parts=len(parts), size=manifest.size,
                        raw_size=manifest.raw_size, seconds=seconds, manifest_key=key)


def _publish_artifacts(manifest: Manifest, store: str, seconds: float) -> None:
    rows = [
        {
            "part": f"{p.kind}: {p.name}",
            "key": p.key,
            "raw": human_size(p.raw_size),
            "stored": human_size(p.size),
            "ratio": f"{p.raw_size / p.size:.2f}" if p.size else "-",
            "sha256": p.sha256[:16],
            "seconds": f"{p.seconds:.1f}",
            "verified by": _verification_note(p),
        }
        for p in manifest.parts
    ]
    create_table_artifact(rows, key="backup-parts", description=f"Parts of backup set {manifest.set_id}")
    lines = [
        f"# Backup set `{manifest.set_id}`",
        "",
        f"- store: `{store}`",
        f"- parts: {len(manifest.parts)}, {human_size(manifest.raw_size)} raw, "
        f"{human_size(manifest.size)} stored",
        f"- took {seconds:.1f} s; manifest written last at `{manifest.completed_at:%Y-%m-%d %H:%M:%S} UTC`",
        f"- tags: {', '.join(manifest.tags) or '-'}",
        "",
        "| part | stored | what it holds |",
        "|---|---|---|",
    ]
    lines += [f"| {p.kind}: `{p.name}` | {human_size(p.size)} | {_verification_note(p)} |" for p in manifest.parts]
    create_markdown_artifact("\n".join(lines), key="backup-summary", description="Backup summary")


def _verification_note(part: Part) -> str:
    if part.tables:
        summed = sum(1 for t in part.tables if t.checksum and not t.checksum.startswith("seq:"))
        rows = sum(t.rows for t in part.tables)
        return f"{len(part.tables)} tables/sequences, {rows} rows, {summed} checksummed"
    if part.redis is not None:
        return f"{part.redis.key_count} keys, digest {part.redis.digest[:12]}"
    if part.files is not None:
        return f"{part.files.files} files, {human_size(part.files.bytes)}"
    if part.weaviate is not None:
        return (f"Weaviate backup {part.weaviate.backup_id} ({part.weaviate.backend}): "
                f"{sum(part.weaviate.objects.values())} objects in {len(part.weaviate.collections)} collections")
    return "sha256 only"
