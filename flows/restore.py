"""The `restore-set` runbook: restore a backup set into NEW targets (new databases, an empty Redis,
a new directory), verifying each part against its manifest. It never overwrites anything: a database
the target server already has (``postgres``, say) is restored beside it under a new name, and a Redis
that holds keys is refused unless ``replace_existing`` (then a safety copy is stored first). The guarded
recovery over production is `disaster-recovery`."""

from __future__ import annotations

import time
from typing import Annotated

from prefect import flow
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from blocks.errors import ConfigurationError
from blocks.postgres import PostgresConnection
from blocks.redis import RedisConnection
from blocks.store import BackupStore
from blocks.weaviate import WeaviateConnection
from flows._form import DANGER, param
from tasks.approval import refused_at_start
from tasks.databases import existing_databases, side_name
from tasks.files import extract_archive
from tasks.log import run_logger
from tasks.manifest import encode_name
from tasks.postgres import restore_database, restore_globals
from tasks.recovery import safety_copy_key
from tasks.redis import check_redis_empty, restore_redis, snapshot_redis
from tasks.store import find_backup_set
from tasks.weaviate import preflight_weaviate_restore, restore_weaviate


class RestoredPart(BaseModel):
    kind: str
    name: str
    target: str
    verified: str
    seconds: float


class RestoreResult(BaseModel):
    set_id: str
    parts: list[RestoredPart]
    seconds: float


@flow(name="restore-set")
def restore_set(
    store: Annotated[BackupStore, param(
        "Backup store", "The store that holds the backup set.")],
    backup_id: Annotated[str, param(
        "Backup set", "A set id (e.g. 20261122T020000Z-ab12cd), or latest (default): the newest complete "
        "set.")] = "latest",
    postgres: Annotated[PostgresConnection | None, param(
        "PostgreSQL server", "The server the set's databases are restored into, as NEW databases (an "
        "existing name is refused). Empty: databases are not restored.")] = None,
    databases: Annotated[list[str] | None, param(
        "Databases", "Which of the set's databases to restore. Empty: all of them.")] = None,
    database_suffix: Annotated[str, param(
        "Database name suffix", "Appended to each restored database's name (e.g. _restored), so a copy can "
        "sit beside the original on the same server. Empty: the original names.")] = "",
    redis: Annotated[RedisConnection | None, param(
        "Redis server", "An EMPTY Redis the snapshot is loaded into. Empty: Redis is not restored.")] = None,
    replace_existing: Annotated[bool, param(
        DANGER + "replace a Redis that holds keys", "Allow a Redis that holds keys: they are saved to the "
        "store first, then replaced by the snapshot. Off by default: a Redis with keys is refused.")] = False,
    files_root: Annotated[str | None, param(
        "Files root", "A NEW directory on this host; each archived directory is restored below it. Empty: "
        "files are not restored.")] = None,
    weaviate: Annotated[WeaviateConnection | None, param(
        "Weaviate", "A Weaviate that lacks the set's collections, to restore them into. Empty: Weaviate is "
        "not restored.")] = None,
) -> RestoreResult:
    """Restore every part of a set into new targets, checking checksums and manifest contents."""
    if (refused := refused_at_start()) is not None:  # an alert's approval form said reject
        return refused
    log = run_logger()
    started = time.monotonic()
    manifest = find_backup_set(store, backup_id)
    log.info("restoring set %s from %s", manifest.set_id, store.describe())
    wanted = {p.kind for p in manifest.parts}
    if wanted == {"pgbase"}:
        raise ConfigurationError(f"set {manifest.set_id} is a PITR base backup: restore it with pitr-restore")
    if wanted & {"postgres", "globals"} and postgres is None:
        raise ConfigurationError(f"set {manifest.set_id} holds PostgreSQL parts: give a postgres target")
    if "redis" in wanted and redis is None:
        raise ConfigurationError(f"set {manifest.set_id} holds a Redis snapshot: give a redis target")
    if "files" in wanted and not files_root:
        raise ConfigurationError(f"set {manifest.set_id} holds directories: give files_root")
    if "weaviate" in wanted and weaviate is None:
        raise ConfigurationError(f"set {manifest.set_id} holds a Weaviate backup: give a weaviate target")

    in_set = [p.name for p in manifest.parts if p.kind == "postgres"]
    unknown = sorted(set(databases or []) - set(in_set))
    if unknown:
        raise ConfigurationError(f"set {manifest.set_id} has no database(s) {unknown}; it has {in_set}")
    chosen = [name for name in in_set if not databases or name in databases]
    names = {name: name + database_suffix for name in chosen}
    if chosen and postgres is not None:
        taken = set(existing_databases(postgres, list(names.values())))
        for name in chosen:
            if names[name] in taken:
                names[name] = side_name(names[name], f"restored_{manifest.set_id[-6:]}")
                log.info("database %r exists on %s: restoring it beside as %r", name + database_suffix,
                         postgres.describe(), names[name])
        clash = existing_databases(postgres, [names[n] for n in chosen if names[n] != n + database_suffix])
        if clash:
            raise ConfigurationError(f"database(s) {clash} already exist on {postgres.describe()} (an earlier "
                                     "restore of this set?): drop them or give a database_suffix; nothing was changed")
    weaviate_part = manifest.part("weaviate")
    if weaviate_part is not None and weaviate is not None:
        preflight_weaviate_restore(weaviate_part, weaviate)
    safety = None
    if redis is not None and "redis" in wanted and not replace_existing:
        check_redis_empty(redis)
    elif redis is not None and "redis" in wanted:
        safety_id = f"restore-set-{manifest.set_id}-{int(time.time())}"
        safety = snapshot_redis(redis, store, safety_id, name="redis-safety", key=safety_copy_key(safety_id))
        log.info("the keys Redis %s held are saved in %s/%s before it is replaced", redis.describe(),
                 store.describe(), safety.key)

    done: list[RestoredPart] = []
    globals_part = manifest.part("globals")
    if globals_part is not None and postgres is not None:
        result = restore_globals(globals_part, store, postgres)
        done.append(RestoredPart(kind="globals", name="globals", target=postgres.describe(),
                                 verified=f"existing roles left as they were: {', '.join(result.roles_kept)}",
                                 seconds=0.0))
    for part in manifest.parts:
        if part.kind == "postgres" and postgres is not None and part.name in chosen:
            restored = restore_database(part, store, postgres, names[part.name])
            done.append(RestoredPart(kind="postgres", name=part.name, target=postgres.describe(restored.database),
                                     verified=f"{restored.tables} tables match", seconds=restored.seconds))
        elif part.kind == "redis" and redis is not None:
            t0 = time.monotonic()
            summary = restore_redis(part, store, redis, flush_first=safety is not None)
            saved = f"; the keys it held are saved in {safety.key}" if safety is not None else ""
            done.append(RestoredPart(kind="redis", name=part.name, target=redis.describe(),
                                     verified=f"{summary.key_count} keys, digest matches{saved}",
                                     seconds=round(time.monotonic() - t0, 3)))
        elif part.kind == "files" and files_root:
            t0 = time.monotonic()
            dest = f"{files_root.rstrip('/')}/{encode_name(part.name)}"
            extracted = extract_archive(part, store, dest)
            done.append(RestoredPart(kind="files", name=part.name, target=extracted.path,
                                     verified=f"{extracted.files} files match",
                                     seconds=round(time.monotonic() - t0, 3)))
    if weaviate_part is not None and weaviate is not None:
        t0 = time.monotonic()
        restored_weaviate = restore_weaviate(weaviate_part, weaviate)
        done.append(RestoredPart(kind="weaviate", name=weaviate_part.name, target=weaviate.describe(),
                                 verified=restored_weaviate.note, seconds=round(time.monotonic() - t0, 3)))
    create_table_artifact([p.model_dump() for p in done], key="restore-parts",
                          description=f"Restore of set {manifest.set_id}")
    return RestoreResult(set_id=manifest.set_id, parts=done, seconds=round(time.monotonic() - started, 3))
