"""The `disaster-recovery` runbook: restore a backup set over production, guarded.

Order: resolve the set -> download and check every part -> approval (unless confirm=True) -> one
recovery per target (a Prefect concurrency limit) -> maintenance on -> restore side by side, verify,
swap in (the old data is kept, renamed) -> health checks -> maintenance off only once healthy.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Annotated, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import Flow, FlowRun
from prefect.concurrency.sync import concurrency
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Cancelled, State
from pydantic import BaseModel, Field

from blocks.app import AppEndpoint
from blocks.postgres import PostgresConnection
from blocks.redis import RedisConnection
from blocks.store import BackupStore
from tasks.app import set_maintenance, wait_until_healthy
from tasks.errors import ConfigurationError
from tasks.files import extract_archive, swap_in_directory
from tasks.locks import ensure_lock, lock_name
from tasks.log import run_logger
from tasks.manifest import Manifest, Part, human_size, set_time
from tasks.metrics import push_flow_run_metrics
from tasks.notify import send_notification
from tasks.postgres import (
    existing_databases,
    restore_database,
    restore_globals,
    set_aside_database,
    side_name,
    swap_in_database,
)
from tasks.redis import restore_redis
from tasks.store import StagedPart, find_set, stage_part

Component = Literal["postgres", "globals", "redis", "files"]


class Approval(RunInput):
    """What the operator answers in the Prefect UI."""

    approve: bool = Field(default=False, description="Restore as described above?")
    note: str = Field(default="", description="Why (kept in the run's log).")


class RecoveryResult(BaseModel):
    set_id: str
    mode: str
    rto_seconds: dict[str, float]
    kept: dict[str, str] = Field(description="Where the data that was replaced is kept.")


def _notify(outcome: str):  # noqa: ANN202 - a Prefect state hook
    def hook(flow: Flow, flow_run: FlowRun, state: State) -> None:
        block_ref = (flow_run.parameters or {}).get("notify_block")
        if block_ref:
            send_notification.fn(block_ref, subject=f"disaster-recovery {outcome}: {flow_run.name}",
                                 body=f"Flow run {flow_run.name} ended {state.type.value}: {state.message or ''}")
    return hook


@flow(name="disaster-recovery", on_completion=[_notify("completed"), push_flow_run_metrics],
      on_failure=[_notify("FAILED"), push_flow_run_metrics], on_crashed=[_notify("CRASHED"), push_flow_run_metrics],
      on_cancellation=[_notify("cancelled")])
def disaster_recovery(
    store: BackupStore,
    backup_id: Annotated[str, Field(description="A set id, or 'latest' (newest complete, preferring "
                                                "one whose restore drill passed).")] = "latest",
    components: Annotated[list[Component] | None, Field(description="Empty: everything in the set.")] = None,
    databases: Annotated[list[str] | None, Field(description="Databases to restore; empty: all.")] = None,
    postgres: PostgresConnection | None = None,
    redis: RedisConnection | None = None,
    files_targets: Annotated[dict[str, str] | None, Field(
        description="Directory in the set -> live directory; empty: the same path as backed up.")] = None,
    mode: Annotated[Literal["side-by-side", "in-place"], Field(
        description="side-by-side: restore beside, verify, swap in. in-place: move the live database "
                    "aside first (needs confirm=True).")] = "side-by-side",
    confirm: Annotated[bool, Field(description="Skip the approval pause (required for in-place).")] = False,
    keep_safety_copy: Annotated[bool, Field(description="in-place only: False drops the live database.")] = True,
    flush_redis_first: Annotated[bool, Field(description="Empty Redis before loading the snapshot.")] = True,
    app: Annotated[AppEndpoint | None, Field(description="Maintenance mode and health checks.")] = None,
    health_timeout_seconds: Annotated[float, Field(ge=1)] = 120,
    approval_timeout_seconds: Annotated[int, Field(ge=10)] = 3600,
    lock_timeout_seconds: Annotated[float, Field(ge=0, description="Wait this long for another recovery "
                                                                   "of the same target.")] = 600,
    jobs: Annotated[int, Field(ge=1, le=32, description="pg_restore parallel jobs.")] = 2,
    staging_dir: Annotated[str | None, Field(description="Where parts are downloaded (needs the "
                                                         "uncompressed size); empty: system temp.")] = None,
    notify_block: Annotated[str | None, Field(description="Told of success and failure.")] = None,
) -> RecoveryResult | State:
    """Restore a backup set over the live targets, with checks before any change and the old data kept."""
    log = run_logger()
    if mode == "in-place" and not confirm:
        raise ConfigurationError("mode=in-place needs confirm=True; nothing was changed")
    manifest = find_set(store.get_client(), backup_id, prefer_verified=True)
    parts = _choose_parts(manifest, components, databases)
    _check_targets(parts, postgres, redis)
    targets = _target_names(parts, postgres, redis, files_targets)
    rto: dict[str, float] = {}
    kept: dict[str, str] = {}
    log.info("recovery of %s from set %s (%s) into %s", [f"{p.kind}:{p.name}" for p in parts], manifest.set_id,
             mode, targets)

    with ExitStack() as stack:
        locks = [lock_name("disaster-recovery", t) for t in targets]
        for name in locks:
            ensure_lock(name)
        t0 = time.monotonic()
        stack.enter_context(concurrency(locks, occupy=1,
                                        timeout_seconds=lock_timeout_seconds, strict=True))
        rto["wait for lock"] = round(time.monotonic() - t0, 2)
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")  # taken under the lock: unique per target
        staging = stack.enter_context(tempfile.TemporaryDirectory(prefix="runbooks-dr-", dir=staging_dir))

        # 1. Everything is downloaded and checked before anything changes.
        t0 = time.monotonic()
        staged = {p.key: stage_part(p, store, staging) for p in parts}
        rto["download + verify"] = round(time.monotonic() - t0, 2)

        # 2. Approval.
        if not confirm:
            answer = _ask_approval(manifest, parts, targets, mode, approval_timeout_seconds)
            if answer is None or not answer.approve:
                why = "timed out" if answer is None else f"rejected ({answer.note or 'no reason given'})"
                log.warning("recovery %s; nothing was changed", why)
                return Cancelled(message=f"approval {why}; nothing was changed")
            log.info("approved: %s", answer.note or "(no note)")

        # 3. Quiesce, restore, check health; maintenance off only once healthy.
        if app is not None:
            set_maintenance(app, True)
        failure: BaseException | None = None
        try:
            _restore_all(parts, staged, store, manifest, postgres, redis, files_targets, mode, keep_safety_copy,
                         flush_redis_first, jobs, stamp, rto, kept)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the health decision
            failure = exc
            log.error("recovery failed: %s; checking the application before deciding on maintenance mode", exc)
        if app is not None:
            t0 = time.monotonic()
            wait_until_healthy(app, timeout_seconds=health_timeout_seconds)  # raises: maintenance stays on
            rto["health check"] = round(time.monotonic() - t0, 2)
            set_maintenance(app, False)
        if failure is not None:
            raise failure

    _report(manifest, parts, mode, rto, kept)
    return RecoveryResult(set_id=manifest.set_id, mode=mode, rto_seconds=rto, kept=kept)


def _choose_parts(manifest: Manifest, components: list[Component] | None, databases: list[str] | None) -> list[Part]:
    wanted = set(components or ["postgres", "globals", "redis", "files"])
    in_set = [p.name for p in manifest.parts if p.kind == "postgres"]
    unknown = sorted(set(databases or []) - set(in_set))
    if unknown:
        raise ConfigurationError(f"set {manifest.set_id} has no database(s) {unknown}; it has {in_set}")
    chosen = [p for p in manifest.parts if p.kind in wanted
              and (p.kind != "postgres" or not databases or p.name in databases)]
    if not chosen:
        raise ConfigurationError(f"set {manifest.set_id} holds none of the components {sorted(wanted)}")
    return chosen


def _check_targets(parts: list[Part], postgres: PostgresConnection | None, redis: RedisConnection | None) -> None:
    kinds = {p.kind for p in parts}
    if kinds & {"postgres", "globals"} and postgres is None:
        raise ConfigurationError("the chosen parts include PostgreSQL: give the postgres target")
    if "redis" in kinds and redis is None:
        raise ConfigurationError("the chosen parts include Redis: give the redis target")


def _target_names(parts: list[Part], postgres: PostgresConnection | None, redis: RedisConnection | None,
                  files_targets: dict[str, str] | None) -> list[str]:
    names = set()
    for part in parts:
        if part.kind in ("postgres", "globals") and postgres is not None:
            names.add(f"{postgres.host}:{postgres.port}")
        elif part.kind == "redis" and redis is not None:
            names.add(f"{redis.host}:{redis.port}")
        elif part.kind == "files":
            names.add((files_targets or {}).get(part.name, part.name))
    return sorted(names)


def _ask_approval(manifest: Manifest, parts: list[Part], targets: list[str], mode: str,
                  timeout: int) -> Approval | None:
    age = datetime.now(UTC) - set_time(manifest.set_id)
    lines = [
        f"## Restore backup set `{manifest.set_id}`?",
        "",
        f"- taken {manifest.completed_at:%Y-%m-%d %H:%M} UTC ({age.total_seconds() / 3600:.1f} h ago), "
        f"{human_size(manifest.size)} stored; every part downloaded and its sha256 checked",
        f"- mode: **{mode}**; targets: {', '.join(f'`{t}`' for t in targets)}",
        "- the data that is replaced is kept (renamed `__pre_restore_...`), nothing is dropped",
        "",
        "| part | size |",
        "|---|---|",
        *[f"| {p.kind}: `{p.name}` | {human_size(p.raw_size)} |" for p in parts],
    ]
    try:
        return pause_flow_run(wait_for_input=Approval.with_initial_data(description="\n".join(lines)),
                              timeout=timeout, poll_interval=2)
    except TimeoutError:
        return None


def _restore_all(parts: list[Part], staged: dict[str, StagedPart], store: BackupStore, manifest: Manifest,
                 postgres: PostgresConnection | None, redis: RedisConnection | None,
                 files_targets: dict[str, str] | None, mode: str, keep_safety_copy: bool, flush_redis_first: bool,
                 jobs: int, stamp: str, rto: dict[str, float], kept: dict[str, str]) -> None:
    short = manifest.set_id.split("-")[-1]
    for part in parts:
        t0 = time.monotonic()
        if part.kind == "globals" and postgres is not None:
            restore_globals(part, store, postgres)
        elif part.kind == "postgres" and postgres is not None:
            keep_as = side_name(part.name, f"pre_restore_{stamp}")
            if mode == "side-by-side":
                beside = side_name(part.name, f"restore_{short}")
                if existing_databases(postgres, [beside]):
                    raise ConfigurationError(f"{beside!r} exists (an earlier attempt?): drop or rename it first")
                restore_database(part, store, postgres, beside, staged_file=staged[part.key].path, jobs=jobs)
                swapped = swap_in_database(postgres, part.name, beside, keep_as)
                if swapped.previous_kept_as:
                    kept[f"postgres:{part.name}"] = swapped.previous_kept_as
            else:
                aside = set_aside_database(postgres, part.name, keep_as if keep_safety_copy else None)
                try:
                    restore_database(part, store, postgres, part.name, staged_file=staged[part.key].path, jobs=jobs)
                except BaseException:
                    if aside:  # put the old database back
                        set_aside_database(postgres, aside, part.name)
                    raise
                if aside:
                    kept[f"postgres:{part.name}"] = aside
        elif part.kind == "redis" and redis is not None:
            restore_redis(part, store, redis, flush_first=flush_redis_first, staged_rdb=staged[part.key].path)
        elif part.kind == "files":
            live = (files_targets or {}).get(part.name, part.name)
            fresh = f"{live.rstrip('/')}.restore-{short}"
            extract_archive(part, store, fresh, staged_tar=staged[part.key].path)
            swapped_dir = swap_in_directory(fresh, live, f"{live.rstrip('/')}.pre_restore_{stamp}")
            if swapped_dir.previous_kept_as:
                kept[f"files:{part.name}"] = swapped_dir.previous_kept_as
        rto[f"{part.kind}:{part.name}"] = round(time.monotonic() - t0, 2)


def _report(manifest: Manifest, parts: list[Part], mode: str, rto: dict[str, float], kept: dict[str, str]) -> None:
    create_table_artifact([{"step": k, "seconds": v} for k, v in rto.items()], key="recovery-rto",
                          description=f"Recovery time per component, set {manifest.set_id}")
    lines = [f"# Recovery from `{manifest.set_id}` ({mode}): done", "",
             f"Total measured RTO: {sum(rto.values()):.1f} s", "",
             "| component | seconds |", "|---|---|", *[f"| {k} | {v} |" for k, v in rto.items()], "",
             "Data that was replaced is kept:", *[f"- {k}: `{v}`" for k, v in kept.items()]]
    create_markdown_artifact("\n".join(lines), key="recovery-report")
