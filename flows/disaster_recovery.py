"""The `disaster-recovery` runbook: restore a backup set over production, all or nothing.

1. Prepare, changing no production data: download and check every part, restore every database beside
   (under a side name, with its properties) and verify it, load the Redis snapshot into a scratch server and
   check its digest, extract directories beside their targets, and pre-flight every target.
2. Approval (unless confirm=True), showing what was prepared and what will be renamed.
3. Commit under maintenance mode: a safety copy of the live Redis into the store, all database renames in
   one transaction, Redis replaced, directories renamed, health. Each step registers its undo first; on a
   failure the undos run in reverse, and maintenance goes off only when production is whole and healthy.
A journal in the store (tasks/recovery.py) records every step, and the `recovery-report` artifact is
written however the run ends.
The approval text is built in flows/_recovery_approval.py, the report in flows/_recovery_report.py.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Literal, get_args

from prefect import flow
from prefect.concurrency.sync import concurrency
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run as current_run
from prefect.states import Cancelled, State
from pydantic import BaseModel, Field

from blocks.app import AppEndpoint
from blocks.errors import ConfigurationError, RestoreFailed, VerificationFailed
from blocks.postgres import PostgresConnection
from blocks.redis import RedisConnection
from blocks.store import BackupStore
from blocks.weaviate import WeaviateConnection
from flows._form import DANGER, param
from flows._recovery_approval import ask_recovery_approval, confirmation_name
from flows._recovery_report import write_report
from tasks.app import AppUnhealthy, set_maintenance, wait_until_healthy
from tasks.approval import refused_at_start
from tasks.databases import (
    Swap,
    SwapPlan,
    drop_databases,
    preflight_swap,
    side_name,
    swap_in_databases,
    swap_out_databases,
)
from tasks.files import (
    extract_archive,
    preflight_directory_swap,
    remove_prepared_tree,
    swap_in_directory,
    swap_out_directory,
)
from tasks.locks import ensure_lock, lock_name
from tasks.log import run_logger
from tasks.manifest import Manifest, Part
from tasks.metrics import push_flow_run_metrics
from tasks.notify import notify_hook
from tasks.postgres import restore_database, restore_globals
from tasks.recovery import Journal, Target, describe, find_unfinished_recoveries, safety_copy_key, write_journal
from tasks.redis import preflight_redis_restore, restore_redis, snapshot_redis
from tasks.staging import StagingProgress, StagingRestarted
from tasks.store import StagedPart, find_backup_set, stage_part
from tasks.undo import UndoStack
from tasks.weaviate import drop_collections, preflight_weaviate_restore, restore_weaviate

Component = Literal["postgres", "globals", "redis", "files", "weaviate"]


class RecoveryResult(BaseModel):
    set_id: str
    recovery_id: str
    mode: str
    rto_seconds: dict[str, float]
    kept: dict[str, str] = Field(description="Where the data that was replaced is kept.")
    redis_safety_copy: str | None = Field(default=None, description="Store key of the live Redis's safety copy.")
    restore_steps: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Each database's restore beside, in seconds per step.")


@dataclass
class _Prepared:
    """What phase 1 made beside production, and how phase 2 puts it in."""

    staged: dict[str, StagedPart] = field(default_factory=dict)
    plan: SwapPlan | None = None
    side_databases: list[str] = field(default_factory=list)
    directories: list[tuple[str, str, str]] = field(default_factory=list)  # (prepared, live, keep_as)
    redis_part: Part | None = None
    weaviate_part: Part | None = None
    restore_steps: dict[str, dict[str, float]] = field(default_factory=dict)  # database -> seconds per step


@flow(name="disaster-recovery", on_completion=[notify_hook("completed"), push_flow_run_metrics],
      on_failure=[notify_hook("FAILED"), push_flow_run_metrics],
      on_crashed=[notify_hook("CRASHED"), push_flow_run_metrics],
      on_cancellation=[notify_hook("cancelled")])
def disaster_recovery(
    store: Annotated[BackupStore, param(
        "Backup store", "The store that holds the backup set.")],
    backup_id: Annotated[str, param(
        "Backup set", "A set id, or latest (default): the newest complete set, preferring one whose restore "
        "drill passed.")] = "latest",
    postgres: Annotated[PostgresConnection | None, param(
        "PostgreSQL server (live)", "The live server whose databases are REPLACED by the set's. Empty: "
        "PostgreSQL is not recovered.")] = None,
    redis: Annotated[RedisConnection | None, param(
        "Redis server (live)", "The live Redis whose data is REPLACED by the snapshot (a safety copy is saved "
        "to the store first). Empty: Redis is not recovered.")] = None,
    app: Annotated[AppEndpoint | None, param(
        "Application", "Switched to maintenance mode during the swap, and health-checked after. Empty: no "
        "maintenance mode and no health check.")] = None,
    mode: Annotated[Literal["side-by-side", "in-place"], param(
        "Mode", "Both restore beside, verify, then swap in. side-by-side (default) keeps the replaced "
        "databases (renamed). in-place (needs the approval skipped) drops them after success when the safety "
        "copy is off.")] = "side-by-side",
    confirm: Annotated[bool, param(
        DANGER + "skip the approval", "Swap in without pausing for approval in the UI. Required for "
        "in-place. Off by default: the run pauses and shows what will be replaced.")] = False,
    keep_safety_copy: Annotated[bool, param(
        "Keep the replaced databases", "in-place only: off DROPS the replaced databases once the recovery "
        "has succeeded. On by default: they are kept, renamed.")] = True,
    components: Annotated[list[Component] | None, param(
        "Components", "Which parts of the set to recover. Empty (default): everything in the set.")] = None,
    databases: Annotated[list[str] | None, param(
        "Databases", "Databases to recover. Empty (default): all in the set.")] = None,
    files_targets: Annotated[dict[str, str] | None, param(
        "Directory targets", "Directory in the set -> live directory. Empty (default): the same path as "
        "backed up.")] = None,
    weaviate: Annotated[WeaviateConnection | None, param(
        "Weaviate", "The Weaviate to restore the set's collections into (they must not exist there). Empty: "
        "Weaviate is not recovered.")] = None,
    approval_timeout_seconds: Annotated[int, param(
        "Approval timeout (s)", "Without an answer in this time the run ends Cancelled; nothing is changed. "
        "3600 by default.", ge=10)] = 3600,
    health_timeout_seconds: Annotated[float, param(
        "Health timeout (s)", "How long the application may take to be healthy after the swap before every "
        "step is undone. 120 by default.", ge=1)] = 120,
    lock_timeout_seconds: Annotated[float, param(
        "Lock wait (s)", "Wait this long for another recovery of the same target, then fail. 600 by "
        "default.", ge=0)] = 600,
    jobs: Annotated[int, param(
        "Restore jobs", "pg_restore parallel jobs, 1-32. 2 by default.", ge=1, le=32)] = 2,
    staging_dir: Annotated[str | None, param(
        "Staging directory", "Where parts are downloaded (needs the uncompressed size). Empty (default): "
        "the system's temporary directory.")] = None,
    notify_block: Annotated[str | None, param(
        "Notify", "A saved notification Block (e.g. slack-webhook/ops) told of success and failure. Empty: "
        "nobody is told.")] = None,
) -> RecoveryResult | State:
    """Restore a backup set over the live targets: prepared and verified beside them, then swapped in as one
    change that is undone whole if any step fails."""
    if (refused := refused_at_start()) is not None:  # an alert's approval form said reject
        return refused
    log = run_logger()
    if mode == "in-place" and not confirm:
        raise ConfigurationError("mode=in-place needs confirm=True; nothing was changed")
    if not keep_safety_copy and mode != "in-place":
        raise ConfigurationError("keep_safety_copy=False is for mode=in-place; nothing was changed")
    if staging_dir and not (os.path.isdir(staging_dir) and os.access(staging_dir, os.W_OK | os.X_OK)):
        raise ConfigurationError(f"staging_dir {staging_dir!r} is not a directory this run can write into; "
                                 "nothing was changed")
    # A plain call, not a task run: on a SQLite-backed Prefect server a task run's records, written just as
    # the per-target lock below asks for its slot, make the slot's UPDATE meet "database is locked", and the
    # client backs off 2 s or more. Its log line still goes to the run's log.
    manifest = find_backup_set.fn(store, backup_id, prefer_verified=True)
    parts = _choose_parts(manifest, components, databases)
    _check_targets(parts, postgres, redis, weaviate)
    lock_targets = _target_names(parts, postgres, redis, files_targets, weaviate)
    log.info("recovery of %s from set %s (%s) into %s", [f"{p.kind}:{p.name}" for p in parts], manifest.set_id,
             mode, lock_targets)
    rto: dict[str, float] = {}

    with ExitStack() as stack:
        locks = [lock_name("disaster-recovery", t) for t in lock_targets]
        for name in locks:
            ensure_lock(name)
        t0 = time.monotonic()
        stack.enter_context(concurrency(locks, occupy=1, timeout_seconds=lock_timeout_seconds, strict=True))
        rto["wait for lock"] = round(time.monotonic() - t0, 2)
        # The download starts at once, beside the checks below (it changes nothing). Not before the lock: on a
        # SQLite-backed Prefect server the download's task-run records then collide with the lock's slot
        # update, and the client backs off for seconds.
        staging = stack.enter_context(tempfile.TemporaryDirectory(prefix="runbooks-dr-", dir=staging_dir))
        downloads = stack.enter_context(_Downloads(parts, store, staging))
        now = datetime.now(UTC)  # taken under the lock: unique per target
        journal = _new_journal(manifest, parts, postgres, redis, files_targets, weaviate, now)
        # A live recovery of these targets holds the lock: an unfinished journal now is one whose process died
        # (its lock lease then ran out).
        _refuse_after_a_dead_recovery(store, journal)
        prepared = _Prepared()
        stack.callback(write_report, journal, manifest, mode, rto, prepared.restore_steps)  # however the run ends
        write_journal(store, journal)

        # 1. Prepare: production data is not touched.
        try:
            _prepare(journal, parts, prepared, downloads, store, postgres, redis, weaviate, jobs, rto)
        except BaseException as exc:
            journal.error = str(exc)
            _discard_prepared(journal, prepared, postgres, "prepare failed")
            write_journal(store, journal)
            raise

        # 2. Approval.
        if not confirm:
            answer = ask_recovery_approval(manifest, journal, parts, mode, keep_safety_copy, store,
                                           approval_timeout_seconds,
                                           confirmation_name(journal.targets, postgres, redis))
            if answer is None or not answer.approved:
                why = "timed out" if answer is None else f"rejected ({answer.note or 'no reason given'})"
                log.warning("recovery %s; nothing was changed", why)
                journal.error = f"approval {why}"
                _discard_prepared(journal, prepared, postgres, "cancelled")
                write_journal(store, journal)
                return Cancelled(message=f"approval {why}; nothing was changed")

        # 3. Commit.
        _commit(journal, prepared, store, postgres, redis, weaviate, app, health_timeout_seconds, rto)
        if mode == "in-place" and not keep_safety_copy and postgres is not None:
            kept_dbs = [t.kept for t in journal.targets if t.kind == "postgres" and t.kept]
            drop_databases(postgres, kept_dbs, why="in-place recovery without a safety copy, after success")
            for target in journal.targets:
                if target.kind == "postgres":
                    target.kept = ""
            write_journal(store, journal)

    kept = {f"{t.kind}:{t.live}": t.kept for t in journal.targets if t.kept}
    safety = journal.redis_safety_copy.key if journal.redis_safety_copy else None
    return RecoveryResult(set_id=manifest.set_id, recovery_id=journal.recovery_id, mode=mode, rto_seconds=rto,
                          kept=kept, redis_safety_copy=safety, restore_steps=prepared.restore_steps)


# ------------------------------------------------------------------------------------------ choosing


def _choose_parts(manifest: Manifest, components: list[Component] | None, databases: list[str] | None) -> list[Part]:
    wanted = set(components or get_args(Component))
    in_set = [p.name for p in manifest.parts if p.kind == "postgres"]
    unknown = sorted(set(databases or []) - set(in_set))
    if unknown:
        raise ConfigurationError(f"set {manifest.set_id} has no database(s) {unknown}; it has {in_set}")
    chosen = [p for p in manifest.parts if p.kind in wanted
              and (p.kind != "postgres" or not databases or p.name in databases)]
    if not chosen:
        raise ConfigurationError(f"set {manifest.set_id} holds none of the components {sorted(wanted)}")
    return chosen


def _check_targets(parts: list[Part], postgres: PostgresConnection | None, redis: RedisConnection | None,
                   weaviate: WeaviateConnection | None) -> None:
    kinds = {p.kind for p in parts}
    if "weaviate" in kinds and weaviate is None:
        raise ConfigurationError("the chosen parts include Weaviate: give the weaviate target")
    if kinds & {"postgres", "globals"} and postgres is None:
        raise ConfigurationError("the chosen parts include PostgreSQL: give the postgres target")
    if "redis" in kinds and redis is None:
        raise ConfigurationError("the chosen parts include Redis: give the redis target")


def _target_names(parts: list[Part], postgres: PostgresConnection | None, redis: RedisConnection | None,
                  files_targets: dict[str, str] | None, weaviate: WeaviateConnection | None) -> list[str]:
    names = set()
    for part in parts:
        if part.kind in ("postgres", "globals") and postgres is not None:
            names.add(f"{postgres.host}:{postgres.port}")
        elif part.kind == "redis" and redis is not None:
            names.add(f"{redis.host}:{redis.port}")
        elif part.kind == "files":
            names.add((files_targets or {}).get(part.name, part.name))
        elif part.kind == "weaviate" and weaviate is not None:
            names.add(weaviate.describe())
    return sorted(names)


def _new_journal(manifest: Manifest, parts: list[Part], postgres: PostgresConnection | None,
                 redis: RedisConnection | None, files_targets: dict[str, str] | None,
                 weaviate: WeaviateConnection | None, now: datetime) -> Journal:
    recovery_id = f"{now:%Y%m%dT%H%M%SZ}-{manifest.set_id[-6:]}"
    label = f"{now:%Y%m%d%H%M%S}"
    targets = []
    for part in parts:
        if part.kind == "postgres":
            targets.append(Target(kind="postgres", source=part.name, live=part.name,
                                  beside=side_name(part.name, f"restore_{label}"),
                                  kept=side_name(part.name, f"pre_restore_{label}")))
        elif part.kind == "globals" and postgres is not None:
            targets.append(Target(kind="globals", source=part.name, live=postgres.describe()))
        elif part.kind == "redis" and redis is not None:
            targets.append(Target(kind="redis", source=part.name, live=redis.describe()))
        elif part.kind == "files":
            live = (files_targets or {}).get(part.name, part.name).rstrip("/")
            targets.append(Target(kind="files", source=part.name, live=live, beside=f"{live}.restore-{label}",
                                  kept=f"{live}.pre_restore_{label}"))
        elif part.kind == "weaviate" and weaviate is not None:
            targets.append(Target(kind="weaviate", source=part.name, live=weaviate.describe()))
    server = {}
    if postgres is not None:
        server["postgres"] = postgres.describe()
    if redis is not None:
        server["redis"] = redis.describe()
    return Journal(recovery_id=recovery_id, set_id=manifest.set_id, flow_run_id=str(current_run.id or "") or None,
                   server=server, started_at=now, updated_at=now, targets=targets)


def _refuse_after_a_dead_recovery(store: BackupStore, journal: Journal) -> None:
    stuck = find_unfinished_recoveries(store, {t.live for t in journal.targets})
    if stuck:
        raise ConfigurationError(
            "an earlier recovery of these targets stopped while changing them; production may be mixed. "
            "Look with `runbooks recover-status " + stuck[-1].recovery_id + "` and settle it first "
            "(docs/disaster-recovery.md, 'A recovery that died'); nothing was changed.\n" + describe(stuck[-1]))


# ------------------------------------------------------------------------------------------- phase 1


class _Downloads:
    """Every part downloaded and checked into ``staging``, one after another in the background, in the order
    the recovery uses them. Leaving stops what has not started and waits for what has: nothing writes into
    ``staging`` once it is removed."""

    _ORDER = {"globals": 0, "postgres": 1, "redis": 2, "files": 3, "weaviate": 4}

    def __init__(self, parts: list[Part], store: BackupStore, staging: str) -> None:
        self.parts, self.store, self.staging = parts, store, staging
        self.futures: dict[str, PrefectFuture[StagedPart]] = {}
        # how far each database's download got, for a restore that follows it (tasks.pg_load)
        self.progress = {p.key: StagingProgress() for p in parts if p.kind == "postgres"}
        self.waited = 0.0  # seconds the recovery spent waiting for a part

    def __enter__(self) -> _Downloads:
        self.cancel = threading.Event()
        previous: list[PrefectFuture[StagedPart]] = []
        for part in sorted(self.parts, key=lambda p: self._ORDER[p.kind]):
            self.futures[part.key] = stage_part.submit(part, self.store, self.staging, cancel=self.cancel,
                                                       progress=self.progress.get(part.key), wait_for=previous)
            previous = [self.futures[part.key]]
        return self

    def result(self, part: Part) -> StagedPart:
        started = time.monotonic()
        try:
            return self.futures[part.key].result()
        finally:
            self.waited += time.monotonic() - started

    def failure(self, part: Part) -> Exception | None:
        """Once the part's download has ended: its error, or None if it was checked good."""
        try:
            self.result(part)
        except Exception as exc:  # noqa: BLE001 - returned: the caller raises it
            return exc
        return None

    def __exit__(self, *_exc: object) -> None:
        self.cancel.set()
        for future in self.futures.values():
            future.wait()


def _prepare(journal: Journal, parts: list[Part], prepared: _Prepared, downloads: _Downloads, store: BackupStore,
             postgres: PostgresConnection | None, redis: RedisConnection | None,
             weaviate: WeaviateConnection | None, jobs: int, rto: dict[str, float]) -> None:
    """Everything that can fail before production changes: download, restore beside, verify, pre-flight.

    A database is restored beside while the next parts are still downloading.
    """
    def staged(part: Part) -> StagedPart:
        if part.key not in prepared.staged:
            journal.step = f"downloading and checking {part.kind} part {part.name!r}"
            prepared.staged[part.key] = downloads.result(part)
            rto["download + verify"] = round(downloads.waited, 2)  # what the run waited: it starts first
        return prepared.staged[part.key]

    globals_part = next((p for p in parts if p.kind == "globals"), None)
    if globals_part is not None and postgres is not None:
        staged(globals_part)  # every part is checked before anything is made from it
        journal.step = "creating the roles the server lacks (existing roles are left as they are)"
        t0 = time.monotonic()
        restore_globals(globals_part, store, postgres)
        journal.mark("prepared", "globals")
        rto["globals"] = round(time.monotonic() - t0, 2)

    swaps = []
    for part in (p for p in parts if p.kind == "postgres"):
        assert postgres is not None
        target = journal.target("postgres", part.name)
        journal.step = f"restoring database {part.name!r} beside as {target.beside!r}, as it downloads"
        t0 = time.monotonic()
        prepared.side_databases.append(target.beside)
        try:
            restored = restore_database(part, store, postgres, target.beside, jobs=jobs,
                                        staging=downloads.progress[part.key])
        except StagingRestarted as exc:
            run_logger().warning("%s; restoring %r again once the download has been checked", exc, part.name)
            staged_dump = staged(part).path  # the download's final result: after its retries, or its error
            journal.step = f"restoring database {part.name!r} beside as {target.beside!r}"
            restored = restore_database(part, store, postgres, target.beside, staged_file=staged_dump, jobs=jobs)
        except (RestoreFailed, VerificationFailed) as exc:
            # It restored bytes whose download was not yet checked: a part that then fails its check is what
            # made pg_restore (or the comparison) fail, and the run says so.
            if (failed := downloads.failure(part)) is not None:
                raise failed from exc
            raise
        prepared.staged[part.key] = downloads.result(part)  # the restore saw its download checked
        target.state = "prepared"
        swaps.append(Swap(live=part.name, restored=target.beside, kept=target.kept))
        rto[f"postgres:{part.name}"] = round(time.monotonic() - t0, 2)
        prepared.restore_steps[part.name] = restored.steps
    if swaps:
        assert postgres is not None
        journal.step = "pre-flight of the database renames"
        prepared.plan = preflight_swap(postgres, swaps)

    for part in (p for p in parts if p.kind == "redis"):
        assert redis is not None
        journal.step = "loading the Redis snapshot into a scratch server and pre-flight of the target"
        t0 = time.monotonic()
        preflight_redis_restore(part, redis, staged_rdb=staged(part).path)
        prepared.redis_part = part
        journal.mark("prepared", "redis")
        rto["redis pre-flight"] = round(time.monotonic() - t0, 2)

    for part in (p for p in parts if p.kind == "files"):
        target = journal.target("files", part.name)
        journal.step = f"extracting {part.name} beside its target as {target.beside}"
        t0 = time.monotonic()
        prepared.directories.append((target.beside, target.live, target.kept))
        extract_archive(part, store, target.beside, staged_tar=staged(part).path)
        preflight_directory_swap(target.beside, target.live, target.kept)
        target.state = "prepared"
        rto[f"files:{part.name}"] = round(time.monotonic() - t0, 2)

    for part in (p for p in parts if p.kind == "weaviate"):
        assert weaviate is not None
        journal.step = "pre-flight of the Weaviate restore"
        staged(part)
        preflight_weaviate_restore(part, weaviate)
        prepared.weaviate_part = part
        journal.mark("prepared", "weaviate")
    journal.step = "prepared"


def _discard_prepared(journal: Journal, prepared: _Prepared, postgres: PostgresConnection | None,
                      phase: Literal["prepare failed", "cancelled"]) -> None:
    """Remove what phase 1 made beside production; production itself was never touched."""
    journal.phase = phase
    if prepared.side_databases and postgres is not None:
        drop_databases(postgres, prepared.side_databases, why="prepared copies of a recovery that did not commit")
    for beside, _live, _kept in prepared.directories:
        remove_prepared_tree(beside)
    for target in journal.targets:
        if target.state == "prepared":
            target.state = "untouched"



# ------------------------------------------------------------------------------------------- phase 2


def _commit(journal: Journal, prepared: _Prepared, store: BackupStore, postgres: PostgresConnection | None,
            redis: RedisConnection | None, weaviate: WeaviateConnection | None, app: AppEndpoint | None,
            health_timeout: float, rto: dict[str, float]) -> None:
    """Maintenance on, Redis safety copy, then every swap with its undo registered first, then health.
    On failure: undo in reverse, and maintenance off only when production is whole and healthy."""
    log = run_logger()
    journal.phase = "commit"

    def step(text: str) -> None:
        journal.step = text
        write_journal(store, journal)

    if app is not None:
        step("maintenance mode on")
        set_maintenance(app, True)
        journal.maintenance = True
    if prepared.redis_part is not None and redis is not None:
        step("safety copy of the live Redis into the store")
        t0 = time.monotonic()
        journal.redis_safety_copy = snapshot_redis(redis, store, journal.recovery_id, name="redis-safety",
                                                   key=safety_copy_key(journal.recovery_id))
        rto["redis safety copy"] = round(time.monotonic() - t0, 2)
    try:
        with UndoStack() as undo:
            if prepared.plan is not None:
                assert postgres is not None
                plan = prepared.plan
                undo.register("rename the databases back (one transaction)",
                              lambda: _undone(journal, "postgres", swap_out_databases(postgres, plan)))
                journal.mark("replaced", "postgres")  # the transaction commits all or none: see the undo
                step("renaming every restored database in (one transaction)")
                t0 = time.monotonic()
                kept = swap_in_databases(postgres, plan)
                for target in journal.targets:
                    if target.kind == "postgres" and target.kept not in kept:
                        target.kept = ""  # there was no live database of that name: nothing is kept
                rto["database swap"] = round(time.monotonic() - t0, 2)
            if prepared.redis_part is not None:
                assert redis is not None and journal.redis_safety_copy is not None
                safety = journal.redis_safety_copy
                undo.register("reload Redis from its safety copy",
                              lambda: _undone(journal, "redis", restore_redis(safety, store, redis, flush_first=True)))
                journal.mark("replaced", "redis")
                step("replacing the Redis keyspace with the snapshot")
                t0 = time.monotonic()
                restore_redis(prepared.redis_part, store, redis, flush_first=True,
                              staged_rdb=prepared.staged[prepared.redis_part.key].path)
                rto["redis"] = round(time.monotonic() - t0, 2)
            for beside, live, kept_as in prepared.directories:
                undo.register(f"rename {live} back",
                              lambda b=beside, li=live, k=kept_as: _undone_dir(journal, li,
                                                                               swap_out_directory(b, li, k)))
                _target_by_live(journal, "files", live).state = "replaced"
                step(f"renaming {beside} in as {live}")
                if swap_in_directory(beside, live, kept_as).previous_kept_as is None:
                    _target_by_live(journal, "files", live).kept = ""
            if prepared.weaviate_part is not None and prepared.weaviate_part.weaviate is not None:
                assert weaviate is not None
                collections = prepared.weaviate_part.weaviate.collections
                undo.register("delete the restored Weaviate collections (they did not exist before)",
                              lambda: _undone(journal, "weaviate", drop_collections(weaviate, collections)))
                journal.mark("replaced", "weaviate")
                step("restoring the Weaviate collections through its backup API")
                t0 = time.monotonic()
                restore_weaviate(prepared.weaviate_part, weaviate)
                rto["weaviate"] = round(time.monotonic() - t0, 2)
            if app is not None:
                step("health check of the recovered system")
                t0 = time.monotonic()
                wait_until_healthy(app, timeout_seconds=health_timeout)
                rto["health check"] = round(time.monotonic() - t0, 2)
    except BaseException as exc:  # noqa: BLE001 - undone above; re-raised below with what production is now
        journal.error = f"{journal.step}: {exc}"
        journal.undone = [f"{o.step}: {'done' if o.ok else 'FAILED: ' + o.error}" for o in undo.outcomes]
        for target in journal.targets:
            if target.state == "replaced":
                target.state = "undo failed" if not undo.whole else "put back"
            elif target.state == "prepared" and target.kind != "globals":  # its swap was never reached
                target.state = "untouched"
        journal.phase = "rolled back" if undo.whole else "mixed"
        healthy = undo.whole and _healthy(app, health_timeout)
        if healthy and app is not None:
            set_maintenance(app, False)
            journal.maintenance = False
        journal.step = "undone" if undo.whole else "undo incomplete"
        write_journal(store, journal)
        if not undo.whole:
            where = "; ".join(o.step + ": " + o.error for o in undo.outcomes if not o.ok)
            raise RestoreFailed(f"recovery failed at '{journal.error}', and putting production back failed too "
                                f"({where}): production is MIXED, maintenance mode stays ON. See the "
                                "recovery-report artifact and `runbooks recover-status "
                                f"{journal.recovery_id}`") from exc
        state = ("maintenance mode is OFF" if healthy or app is None
                 else "but the application is not healthy, so maintenance mode stays ON")
        raise RestoreFailed(f"recovery failed at '{journal.error}'; every change was undone and production is as "
                            f"it was before the run, {state}. The restored copies are kept beside "
                            "(see the recovery-report artifact)") from exc
    journal.phase = "recovered"
    journal.step = "done"
    if app is not None:
        set_maintenance(app, False)
        journal.maintenance = False
    write_journal(store, journal)
    log.info("recovery %s done: every target holds set %s", journal.recovery_id, journal.set_id)


def _undone(journal: Journal, kind: str, _result: object) -> None:
    journal.mark("put back", kind)


def _undone_dir(journal: Journal, live: str, _renamed: bool) -> None:
    _target_by_live(journal, "files", live).state = "put back"


def _target_by_live(journal: Journal, kind: str, live: str) -> Target:
    return next(t for t in journal.targets if t.kind == kind and t.live == live)


def _healthy(app: AppEndpoint | None, timeout: float) -> bool:
    if app is None:
        return True
    try:
        wait_until_healthy(app, timeout_seconds=timeout)
    except AppUnhealthy:
        return False
    return True
