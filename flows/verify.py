"""The `verify-backup` runbook: the restore drill. Restore a set into scratch servers, compare with
the manifest, run pg_amcheck, and record the result as ``verification.json`` beside the manifest."""

from __future__ import annotations

import secrets
import tempfile
import time
from datetime import UTC, datetime
from typing import Annotated

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_run
from pydantic import BaseModel

from blocks.errors import ConfigurationError, RunbookError, VerificationFailed
from blocks.postgres import PostgresConnection
from blocks.redis import RedisConnection
from blocks.store import BackupStore
from blocks.weaviate import WeaviateConnection
from flows._form import param
from tasks.approval import refused_at_start
from tasks.databases import existing_databases, side_name
from tasks.files import extract_archive
from tasks.log import run_logger
from tasks.manifest import Verification
from tasks.metrics import push_flow_run_metrics
from tasks.notify import notify_hook
from tasks.postgres import (
    compare_with_manifest,
    drop_scratch_databases,
    restore_database,
    restore_globals,
    run_amcheck,
)
from tasks.redis import restore_redis
from tasks.scratch import ScratchPostgres
from tasks.scratch_redis import ScratchRedis
from tasks.store import find_backup_set, record_verification, stage_part
from tasks.weaviate import check_weaviate_backup, drop_collections, preflight_weaviate_restore, restore_weaviate


class VerifyResult(BaseModel):
    set_id: str
    ok: bool
    problems: list[str]
    notes: list[str] = []
    seconds: dict[str, float]


@task(cache_policy=NO_CACHE)
def start_scratch_postgres() -> ScratchPostgres:
    """A temporary cluster for the drill (run as the postgres OS user when we are root)."""
    server = ScratchPostgres(password=secrets.token_urlsafe(16), fast=True).start()
    run_logger().info("drill PostgreSQL started on port %d", server.port)
    return server


@task(cache_policy=NO_CACHE)
def start_scratch_redis() -> ScratchRedis:
    server = ScratchRedis(password=secrets.token_urlsafe(16)).start()
    run_logger().info("drill Redis started on port %d", server.port)
    return server


@flow(name="verify-backup", on_completion=[push_flow_run_metrics],
      on_failure=[notify_hook("FAILED"), push_flow_run_metrics],
      on_crashed=[notify_hook("CRASHED"), push_flow_run_metrics])
def verify_backup(
    store: Annotated[BackupStore, param(
        "Backup store", "The store that holds the backup set.")],
    backup_id: Annotated[str, param(
        "Backup set", "A set id, or latest (default): the newest complete set.")] = "latest",
    drill_postgres: Annotated[PostgresConnection | None, param(
        "Drill PostgreSQL server", "A drill server to restore into (scratch databases, dropped after). "
        "Empty (default): a temporary cluster started on this host, removed after.")] = None,
    amcheck: Annotated[bool, param(
        "Run amcheck", "Run pg_amcheck on the restored databases. On by default.")] = True,
    heapallindexed: Annotated[bool, param(
        "amcheck: every heap tuple indexed", "pg_amcheck --heapallindexed: also checks that every row is in "
        "its indexes; slower. Off by default.")] = False,
    jobs: Annotated[int, param(
        "Restore jobs", "pg_restore parallel jobs, 1-32. 2 by default.", ge=1, le=32)] = 2,
    drill_weaviate: Annotated[WeaviateConnection | None, param(
        "Drill Weaviate", "A scratch Weaviate that sees the backups (same backend) to restore into; its "
        "restored collections are deleted after. Empty (default): Weaviate is checked as stored, not "
        "restored.")] = None,
    notify_block: Annotated[str | None, param(
        "Notify", "A saved notification Block (e.g. slack-webhook/ops) told of a failed drill. Empty: nobody "
        "is told.")] = None,
) -> VerifyResult:
    """Prove a backup set restores: every part's checksum, every table's rows and content, Redis keys,
    file trees; the result is written as verification.json and fails the run on any difference."""
    if (refused := refused_at_start()) is not None:  # an alert's approval form said reject
        return refused
    log = run_logger()
    manifest = find_backup_set(store, backup_id)
    if {p.kind for p in manifest.parts} == {"pgbase"}:
        raise ConfigurationError(f"set {manifest.set_id} is a PITR base backup: pitr-base-backup verifies it "
                                 "against backup_manifest, and pitr-restore restores it")
    log.info("restore drill of set %s from %s", manifest.set_id, store.describe())
    problems: list[str] = []
    notes: list[str] = []  # what the drill could not restore, and so does not vouch for
    seconds: dict[str, float] = {}
    scratch_pg: ScratchPostgres | None = None
    scratch_redis: ScratchRedis | None = None
    drill_dbs: list[str] = []
    target = drill_postgres
    with tempfile.TemporaryDirectory(prefix="runbooks-drill-") as staging:
        try:
            staged = {}
            for part in manifest.parts:
                try:
                    staged[part.key] = stage_part(part, store, staging)
                    seconds[f"download {part.kind}:{part.name}"] = staged[part.key].seconds
                except RunbookError as exc:
                    problems.append(f"{part.kind} {part.name}: {exc}")
            pg_parts = [p for p in manifest.parts if p.kind == "postgres" and p.key in staged]
            if pg_parts or manifest.part("globals"):
                if target is None:
                    scratch_pg = start_scratch_postgres()
                    target = PostgresConnection.from_url(scratch_pg.url)
                globals_part = manifest.part("globals")
                if globals_part is not None and globals_part.key in staged and drill_postgres is None:
                    restore_globals(globals_part, store, target)  # only into a cluster of our own
            # A database the drill server has already (``postgres`` in a fresh cluster) is restored beside.
            taken = set(existing_databases(target, [p.name for p in pg_parts])) if target is not None else set()
            # Database properties name roles: only a cluster of our own with the set's globals has them.
            own = drill_postgres is None and manifest.part("globals") is not None
            if pg_parts and not own:
                log.info("database properties (owner, privileges, settings) not compared: the drill has no roles "
                         "of the set (%s)", "a drill server of yours" if drill_postgres else "no globals in the set")
            for part in pg_parts:
                assert target is not None
                beside = drill_postgres is not None or part.name in taken
                name = side_name(part.name, f"drill_{manifest.set_id[-6:]}") if beside else part.name
                t0 = time.monotonic()
                try:
                    restore_database(part, store, target, name, verify=False, staged_file=staged[part.key].path,
                                     jobs=jobs, properties=own)
                    drill_dbs.append(name)
                    problems += [f"{part.name}: {p}" for p in compare_with_manifest(target, name, part,
                                                                                   properties=own)]
                    if amcheck:
                        checked = run_amcheck(target, name, heapallindexed=heapallindexed)
                        problems += [f"{part.name}: amcheck: {p}" for p in checked.problems]
                except RunbookError as exc:
                    problems.append(f"{part.name}: {exc}")
                seconds[f"postgres:{part.name}"] = round(time.monotonic() - t0, 3)
            redis_part = manifest.part("redis")
            if redis_part is not None and redis_part.key in staged:
                scratch_redis = start_scratch_redis()
                t0 = time.monotonic()
                try:
                    restore_redis(redis_part, store, RedisConnection.from_url(scratch_redis.url),
                                  staged_rdb=staged[redis_part.key].path)
                except RunbookError as exc:
                    problems.append(f"redis: {exc}")
                seconds["redis"] = round(time.monotonic() - t0, 3)
            weaviate_part = manifest.part("weaviate")
            if weaviate_part is not None and weaviate_part.key in staged:
                t0 = time.monotonic()
                try:
                    if drill_weaviate is None:
                        found = check_weaviate_backup(weaviate_part, store, None)
                        problems += [f"weaviate: {p}" for p in found]
                        notes.append("weaviate: stored, not restored (no drill_weaviate given)")
                    else:
                        preflight_weaviate_restore(weaviate_part, drill_weaviate)
                        assert weaviate_part.weaviate is not None
                        try:
                            restore_weaviate(weaviate_part, drill_weaviate)
                        finally:
                            drop_collections(drill_weaviate, weaviate_part.weaviate.collections)
                except RunbookError as exc:
                    problems.append(f"weaviate: {exc}")
                seconds["weaviate"] = round(time.monotonic() - t0, 3)
            for part in (p for p in manifest.parts if p.kind == "files" and p.key in staged):
                t0 = time.monotonic()
                try:
                    extract_archive(part, store, f"{staging}/extracted/{part.key.rsplit('/', 1)[-1]}",
                                    staged_tar=staged[part.key].path)
                except RunbookError as exc:
                    problems.append(f"files {part.name}: {exc}")
                seconds[f"files:{part.name}"] = round(time.monotonic() - t0, 3)
        finally:
            if scratch_redis is not None:
                scratch_redis.stop()
            if scratch_pg is not None:
                scratch_pg.stop()
            elif drill_postgres is not None and drill_dbs:
                drop_scratch_databases(drill_postgres, drill_dbs)

    ok = not problems
    record_verification(store, Verification(
        set_id=manifest.set_id, verified_at=datetime.now(UTC), ok=ok, problems=problems, notes=notes,
        seconds=seconds,
        flow_run_id=str(current_run.id or "") or None))
    create_table_artifact([{"step": k, "seconds": v} for k, v in seconds.items()], key="verify-timings",
                          description=f"Restore drill of {manifest.set_id}")
    create_markdown_artifact(
        f"# Restore drill of `{manifest.set_id}`: {'PASSED' if ok else 'FAILED'}\n\n"
        + ("\n".join(f"- {p}" for p in problems) if problems else
           f"All {len(manifest.parts) - len(notes)} restorable parts restored and matched the manifest.")
        + "".join(f"\n- not verified: {n}" for n in notes),
        key="verify-report")
    if not ok:
        raise VerificationFailed(f"set {manifest.set_id} failed its restore drill: " + "; ".join(problems[:5]))
    return VerifyResult(set_id=manifest.set_id, ok=ok, problems=problems, notes=notes, seconds=seconds)

