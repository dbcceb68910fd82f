"""Named restore points: created on the server, recorded in the store for `pitr-restore` to find."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.errors import ConfigurationError
from blocks.postgres import PostgresConnection
from blocks.store import BackupStore, StoreClient
from tasks.log import run_logger
from tasks.manifest import RestorePointRecord, encode_name
from tasks.retry import retry_transient
from tasks.wal import RESTORE_POINTS_PREFIX, parse_lsn


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def create_restore_point(
    pg: PostgresConnection, name: str, store: BackupStore | None = None, *, switch_wal: bool = True,
) -> RestorePointRecord:
    """``pg_create_restore_point(name)`` (e.g. before a migration); recorded in the store when given, so
    `pitr-restore` can pick the base backup for it. ``switch_wal`` closes the segment so it is archived now."""
    if not name or len(name.encode()) > 63:
        raise ConfigurationError(f"restore point name {name!r}: 1 to 63 bytes")
    with pg.connect(autocommit=True) as conn:
        lsn, timeline, sysid = conn.execute(
            "SELECT pg_create_restore_point(%s)::text, (SELECT timeline_id FROM pg_control_checkpoint()), "
            "(SELECT system_identifier::text FROM pg_control_system())", (name,)).fetchone()  # type: ignore[misc]
        created = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        if switch_wal:
            conn.execute("SELECT pg_switch_wal()")
    record = RestorePointRecord(name=name, lsn=lsn, timeline=timeline, created_at=created, system_identifier=sysid)
    if store is not None:
        client = store.get_client()
        client.put_bytes(restore_point_key(name, parse_lsn(lsn)), record.to_bytes())
    run_logger().info("restore point %r at %s (timeline %d) on %s", name, lsn, timeline, pg.describe())
    return record


def restore_point_key(name: str, lsn: int) -> str:
    return f"{RESTORE_POINTS_PREFIX}{encode_name(name)}/{lsn:016X}.json"


def find_restore_point(client: StoreClient, name: str) -> RestorePointRecord | None:
    """The newest recorded restore point of that name (recovery stops at the first one after the backup)."""
    keys = sorted(o.key for o in client.list(f"{RESTORE_POINTS_PREFIX}{encode_name(name)}/"))
    if not keys:
        return None
    return RestorePointRecord.model_validate_json(client.get_bytes(keys[-1]))
