"""The `apply-retention` runbook: prune a store's backup sets with a GFS policy.

Inventory (manifests, drill records, sets without manifest) -> pure plan -> plan artifact -> unless
``dry_run``: delete the planned sets (manifest first) and abort stale multipart uploads.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

from blocks.store import BackupStore
from flows._form import param
from tasks.approval import refused_at_start
from tasks.log import run_logger
from tasks.manifest import human_size
from tasks.metrics import runbook_metrics_hooks
from tasks.pitr.retention import PitrRetention, expire_pitr_backups
from tasks.retention import (
    Decision,
    RetentionPolicy,
    SetInfo,
    abort_stale_uploads,
    delete_set,
    gather_inventory,
    physical_backup_ids,
    plan_retention,
)


class RetentionResult(BaseModel):
    store: str
    policy: str
    dry_run: bool
    kept: list[str] = Field(description="Set ids kept (complete and incomplete), newest first.")
    planned: list[str] = Field(description="Set ids the plan deletes, newest first.")
    deleted: list[str] = Field(description="Set ids actually deleted; empty in a dry run.")
    deleted_bytes: int
    aborted_uploads: int | None = Field(description="None in a dry run.")
    decisions: list[Decision]
    pitr: PitrRetention | None = Field(default=None, description="Base backups and WAL, when the store has any.")


@flow(name="apply-retention", log_prints=False, **runbook_metrics_hooks())
def apply_retention(
    store: Annotated[BackupStore, param(
        "Backup store", "The store whose backup sets are pruned (WAL is not touched here).")],
    dry_run: Annotated[bool, param(
        "Dry run (plan only)", "On (default for a run from the UI): only publish the plan, delete nothing. "
        "Unticked, the sets the plan marks are deleted. The schedule runs with it off.")] = True,
    keep_last: Annotated[int, param(
        "Keep newest", "Keep the newest N complete sets. 3 by default.", ge=0)] = 3,
    daily: Annotated[int, param(
        "Keep daily", "Keep one set for each of the newest N days (UTC). 7 by default.", ge=0)] = 7,
    weekly: Annotated[int, param(
        "Keep weekly", "Keep one set for each of the newest N ISO weeks. 4 by default.", ge=0)] = 4,
    monthly: Annotated[int, param(
        "Keep monthly", "Keep one set for each of the newest N months. 12 by default.", ge=0)] = 12,
    yearly: Annotated[int, param(
        "Keep yearly", "Keep one set for each of the newest N years. 0 by default: none kept for the "
        "year alone.", ge=0)] = 0,
    min_age_hours: Annotated[float, param(
        "Minimum age (h)", "Never delete a set younger than this. 24 by default.", ge=0)] = 24,
    incomplete_grace_hours: Annotated[float, param(
        "Incomplete grace (h)", "Sets without a manifest, and unfinished multipart uploads, idle this long "
        "are deleted. Must exceed the longest backup run. 24 by default.", ge=0)] = 24,
    pitr_keep_last: Annotated[int, param(
        "PITR: keep newest base backups", "Keep the newest N physical base backups (and their WAL). 2 by "
        "default.", ge=1)] = 2,
    pitr_keep_within_days: Annotated[float | None, param(
        "PITR: restorable window (days)", "Keep every moment of this window restorable. 7 by default; "
        "empty: only pitr_keep_last counts.", ge=0)] = 7,
) -> RetentionResult:
    """Keep what the policy and the safety rules say, delete the rest (only with dry_run=false)."""
    if (refused := refused_at_start()) is not None:  # an alert's approval form said reject
        return refused
    log = run_logger()
    policy = RetentionPolicy(  # an all-zero policy is a ConfigurationError here, before any I/O
        keep_last=keep_last, daily=daily, weekly=weekly, monthly=monthly, yearly=yearly,
        min_age=timedelta(hours=min_age_hours), incomplete_grace=timedelta(hours=incomplete_grace_hours),
    )
    store.get_client()  # configuration errors surface before anything is listed
    if policy.incomplete_grace < timedelta(hours=1):
        log.warning("incomplete_grace is %.2f h: a backup still running may lose its parts and uploads",
                    incomplete_grace_hours)
    now = datetime.now(UTC)
    inventory = gather_inventory(store)
    # Physical base backups follow the PITR policy below (with the WAL they need), never the GFS buckets.
    physical = set(physical_backup_ids(store))
    decisions = plan_retention(inventory.sets, policy, now, protect=lambda s: (
        "PITR base backup: kept or expired by the PITR policy" if s.set_id in physical else None))
    doomed = [d for d in decisions if not d.keep]
    log.info("retention plan for %s (%s): keep %d, delete %d%s", inventory.store, policy.describe(),
             len(decisions) - len(doomed), len(doomed), " (dry run)" if dry_run else "")
    _publish_plan(inventory.sets, decisions, now)

    deleted: list[str] = []
    freed = 0
    aborted: int | None = None
    if not dry_run:
        # Oldest complete sets first, then leftovers of failed runs; a failure stops the run (re-run to resume).
        for decision in sorted(doomed, key=lambda d: (not d.complete, d.set_id)):
            done = delete_set(store, decision.set_id, complete=decision.complete)
            deleted.append(done.set_id)
            freed += done.bytes
        aborted = abort_stale_uploads(store, policy.incomplete_grace)
    pitr = expire_pitr_backups(store, keep_last=pitr_keep_last, keep_within_days=pitr_keep_within_days,
                               dry_run=dry_run) if physical else None

    result = RetentionResult(
        store=inventory.store, policy=policy.describe(), dry_run=dry_run,
        kept=[d.set_id for d in decisions if d.keep], planned=[d.set_id for d in doomed],
        deleted=sorted(deleted, reverse=True), deleted_bytes=freed, aborted_uploads=aborted, decisions=decisions,
        pitr=pitr,
    )
    _publish_summary(inventory.sets, result)
    return result


def _publish_plan(sets: list[SetInfo], decisions: list[Decision], now: datetime) -> None:
    info = {s.set_id: s for s in sets}
    rows = [
        {
            "set": d.set_id,
            "started (UTC)": f"{info[d.set_id].time:%Y-%m-%d %H:%M}",
            "age": _age(now - info[d.set_id].time),
            "manifest": "yes" if d.complete else "NO",
            "drill": _drill(info[d.set_id]),
            "size": human_size(info[d.set_id].size),
            "decision": "keep" if d.keep else "DELETE",
            "reason": d.reason,
        }
        for d in decisions
    ]
    create_table_artifact(rows, key="retention-plan", description="Retention plan: every set, kept or deleted")


def _publish_summary(sets: list[SetInfo], result: RetentionResult) -> None:
    info = {s.set_id: s for s in sets}
    kept_complete = [i for i in result.kept if info[i].complete]
    kept_verified = [i for i in kept_complete if info[i].is_verified]
    planned_bytes = sum(info[i].size for i in result.planned)
    mode = "dry run: nothing deleted" if result.dry_run else f"{len(result.deleted)} sets deleted"
    lines = [
        f"# Retention of `{result.store}` ({mode})",
        "",
        f"- policy: {result.policy}",
        f"- kept: {len(kept_complete)} backup sets ({len(kept_verified)} verified by a restore drill)"
        f" and {len(result.kept) - len(kept_complete)} sets without manifest still within grace",
        f"- planned for deletion: {len(result.planned)} sets, {human_size(planned_bytes)}",
    ]
    if result.dry_run:
        lines.append("- run with `dry_run=false` to apply this plan")
    else:
        lines += [f"- deleted: {len(result.deleted)} sets, {human_size(result.deleted_bytes)} freed",
                  f"- aborted stale multipart uploads: {result.aborted_uploads}"]
    if kept_complete and not kept_verified:
        lines.append("- **warning: no kept set has passed a restore drill; run `verify-backup`**")
    if result.planned:
        lines += ["", "| set | manifest | reason |", "|---|---|---|"]
        lines += [f"| `{d.set_id}` | {'yes' if d.complete else 'no'} | {d.reason} |"
                  for d in result.decisions if not d.keep]
    create_markdown_artifact("\n".join(lines), key="retention-summary", description="Retention summary")


def _drill(info: SetInfo) -> str:
    if not info.complete:
        return "-"
    return {True: "passed", False: "FAILED", None: "never"}[info.verified]


def _age(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours / 24:.1f} d" if abs(hours) >= 48 else f"{hours:.1f} h"
