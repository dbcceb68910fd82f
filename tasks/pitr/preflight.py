"""Is a server ready for PITR into this store: settings, privileges, and a WAL switch seen in the store."""

from __future__ import annotations

import json
import time

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from blocks.errors import PreflightFailed, StoreError
from blocks.postgres import PostgresConnection
from blocks.store import BackupStore
from tasks.log import run_logger
from tasks.retry import retry_transient
from tasks.wal import CLUSTER_KEY, wal_key


class ArchivingStatus(BaseModel):
    """What the preflight found: the server's PITR-relevant settings and a segment seen in the store."""

    server_version: str
    system_identifier: str
    timeline: int
    segment_size: int
    archive_command: str
    last_archived_wal: str | None
    checked_segment: str | None = Field(description="Segment switched to and found in the store (end to end).")


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def check_pitr_ready(pg: PostgresConnection, store: BackupStore, *, archive_wait_seconds: float = 60) -> (
        ArchivingStatus):
    """Refuse, with every reason at once, a server whose WAL does not reach this store's archive.

    wal_level, archive_mode, archive_command running wal-push, a healthy pg_stat_archiver, the replication
    privilege, a free WAL sender, the archive belonging to this cluster; then a WAL switch whose segment
    must show up in the store.
    """
    log = run_logger()
    client = store.get_client()
    with pg.connect(autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version'), current_setting('wal_level'), "
            "current_setting('archive_mode'), current_setting('archive_command'), "
            "pg_size_bytes(current_setting('wal_segment_size')), current_setting('max_wal_senders')::int, "
            "(SELECT system_identifier::text FROM pg_control_system()), "
            "(SELECT timeline_id FROM pg_control_checkpoint()), pg_is_in_recovery(), "
            "(SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), "
            "(SELECT count(*) FROM pg_stat_replication)"
        ).fetchone()
        assert row is not None
        (version, wal_level, archive_mode, archive_command, segment_size, max_senders, sysid, timeline,
         in_recovery, can_replicate, senders_used) = row
        archiver = conn.execute(
            "SELECT last_archived_wal, last_archived_time, failed_count, last_failed_wal, last_failed_time "
            "FROM pg_stat_archiver").fetchone()
        assert archiver is not None
        last_archived, last_archived_time, failed_count, last_failed, last_failed_time = archiver
        problems = []
        if wal_level not in ("replica", "logical"):
            problems.append(f"wal_level is {wal_level}: set wal_level = replica (restart needed)")
        if archive_mode not in ("on", "always"):
            problems.append(f"archive_mode is {archive_mode}: set archive_mode = on (restart needed)")
        if "wal-push" not in archive_command:
            problems.append(f"archive_command is {archive_command!r}: set it to "
                            "'<path>/runbooks wal-push --config <env file> %p' (reload)")
        if last_failed_time is not None and (last_archived_time is None or last_failed_time > last_archived_time):
            problems.append(f"archiving is failing: {failed_count} failures, the last for {last_failed} at "
                            f"{last_failed_time:%Y-%m-%d %H:%M:%S %Z}; see the server log")
        if not can_replicate:
            problems.append(f"role {pg.user} lacks REPLICATION: ALTER ROLE {pg.user} REPLICATION")
        if senders_used >= max_senders:
            problems.append(f"all {max_senders} WAL senders are in use: raise max_wal_senders")
        if in_recovery:
            problems.append("the server is a standby: take the base backup from the primary")
        try:
            recorded = json.loads(client.get_bytes(CLUSTER_KEY))
        except StoreError:
            recorded = None
        if recorded is not None and recorded.get("system_identifier") != str(sysid):
            problems.append(f"the WAL archive in {client.description} belongs to cluster "
                            f"{recorded.get('system_identifier')}, this server is {sysid}: use its own store")
        if problems:
            raise PreflightFailed(f"{pg.describe()} is not ready for PITR into {client.description}: "
                                  + "; ".join(problems) + ". Nothing was backed up.")
        segment = str(conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0])  # type: ignore[index]
    deadline = time.monotonic() + archive_wait_seconds
    while not client.exists(wal_key(segment)):
        if time.monotonic() > deadline:
            raise PreflightFailed(
                f"{segment} of {pg.describe()} did not reach {client.description} within {archive_wait_seconds:.0f} "
                "s after a WAL switch: archive_command archives somewhere else, or is failing (server log, "
                f"pg_stat_archiver). archive_command is {archive_command!r}. Nothing was backed up.")
        time.sleep(0.2)
    log.info("%s (PostgreSQL %s, timeline %d) archives into %s: %s seen there", pg.describe(), version, timeline,
             client.description, segment)
    return ArchivingStatus(server_version=version, system_identifier=str(sysid), timeline=timeline,
                           segment_size=segment_size, archive_command=archive_command,
                           last_archived_wal=last_archived, checked_segment=segment)
