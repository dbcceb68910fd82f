"""Expiring base backups by count and age, and the archived WAL only they needed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from blocks.store import BackupStore
from tasks.log import run_logger
from tasks.manifest import manifest_key, set_prefix
from tasks.pitr.planning import backup_ref, base_backups
from tasks.retry import retry_transient
from tasks.wal import WAL_PREFIX, name_of_key, plan_pitr_retention


class PitrRetention(BaseModel):
    kept: list[str]
    expired: list[str]
    wal_deleted: int
    oldest_needed: str | None
    dry_run: bool


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def expire_pitr_backups(
    store: BackupStore, *, keep_last: int = 2, keep_within_days: float | None = None, dry_run: bool = False,
) -> PitrRetention:
    """Expire base backups by count and age, then the archived WAL no kept base backup needs.

    A backup's manifest goes first (from then on it does not exist), then its parts; WAL below the oldest
    kept backup's start segment goes last. Timeline histories and restore points stay.
    """
    client = store.get_client()
    manifests = base_backups(client)
    archived = [n for n in (name_of_key(o.key) for o in client.list(WAL_PREFIX)) if n]
    plan = plan_pitr_retention(
        [backup_ref(m) for m in manifests], archived, keep_last=keep_last,
        keep_within=timedelta(days=keep_within_days) if keep_within_days else None, now=datetime.now(UTC))
    log = run_logger()
    if not dry_run:
        for set_id in plan.expire:
            client.delete(manifest_key(set_id))
            for obj in client.list(set_prefix(set_id)):
                client.delete(obj.key)
            log.info("expired base backup %s", set_id)
        doomed = set(plan.delete_wal)
        for obj in client.list(WAL_PREFIX):
            if name_of_key(obj.key) in doomed:
                client.delete(obj.key)
    log.info("PITR retention in %s%s: kept %s, expired %s, %d WAL files %s (oldest needed %s)",
             client.description, " (dry run)" if dry_run else "", plan.keep, plan.expire, len(plan.delete_wal),
             "to delete" if dry_run else "deleted", plan.oldest_needed)
    return PitrRetention(kept=plan.keep, expired=plan.expire, wal_deleted=len(plan.delete_wal),
                         oldest_needed=plan.oldest_needed, dry_run=dry_run)
