"""Point-in-time recovery runbooks.

`pitr-base-backup`: check the server archives its WAL into the store (wal-push), stream a physical base
backup into it, wait for the WAL that makes it consistent, re-read it against PostgreSQL's backup_manifest,
and write the manifest last; optionally expire old base backups and the WAL only they needed.

`pitr-restore`: choose a base backup for the target (a time, an LSN, a named restore point, or the end of
the archive), check the WAL chain, extract it into a NEW directory, verify every file, start it as the
postgres OS user with restore_command = wal-fetch, wait for recovery to end and check where it stopped.
The restored cluster stays running for inspection or a swap; nothing existing is ever touched.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run as current_run
from pydantic import BaseModel, Field

from blocks.errors import RestoreFailed
from blocks.postgres import PostgresConnection
from blocks.store import DEFAULT_STORE, BackupStore
from flows._form import DANGER, param
from flows.backup import runbooks_version
from tasks.approval import refused_at_start
from tasks.log import run_logger
from tasks.manifest import PhysicalBackup, build_manifest, human_size, new_set_id
from tasks.metrics import runbook_metrics_hooks
from tasks.pitr.base_backup import take_base_backup, verify_base_backup, wait_for_backup_wal
from tasks.pitr.extract import check_restore_target, extract_base_backup, verify_restored_files
from tasks.pitr.planning import plan_restore
from tasks.pitr.preflight import check_pitr_ready
from tasks.pitr.recovery import start_restored_cluster, target_problems, wait_for_recovery
from tasks.pitr.recovery_config import check_restore_command, configure_recovery
from tasks.pitr.retention import expire_pitr_backups
from tasks.store import discard_incomplete_set, write_manifest
from tasks.wal import (
    RecoveryTarget,
    parse_lsn,
    recovery_settings,
    restore_command_argv,
    restore_command_for,
    restore_command_line,
    segment_name,
    segment_of_lsn,
)


class PitrBackupResult(BaseModel):
    set_id: str
    store: str
    timeline: int
    start_lsn: str
    stop_lsn: str
    wal_segments: int
    size: int
    raw_size: int
    files: int
    files_verified: bool
    seconds: float
    backup_seconds: float
    expired: list[str] = Field(default_factory=list)


@flow(name="pitr-base-backup", log_prints=False, **runbook_metrics_hooks())
def pitr_base_backup(
    postgres: Annotated[PostgresConnection, param(
        "PostgreSQL server", "The server to back up (a replication connection; its archive_command must "
        "archive WAL into the same store with runbooks wal-push).")],
    store: Annotated[BackupStore | None, param(
        "Backup store", "The store wal-push archives into. Empty: " + DEFAULT_STORE + ".")] = None,
    verify: Annotated[bool, param(
        "Verify after writing", "Re-read the stored backup and check every file against backup_manifest "
        "(sizes; with SHA256 checksums, contents). On by default.")] = True,
    keep_last: Annotated[int | None, param(
        DANGER + "expire all but the newest N", "After the backup, delete all but the newest N base backups "
        "(and WAL only they needed). Empty (default): nothing is expired.", ge=1)] = None,
    keep_within_days: Annotated[float | None, param(
        "Keep restorable window (days)", "With keep_last: also keep every base backup this point-in-time "
        "window needs. Empty: only keep_last counts.", gt=0)] = None,
    tags: Annotated[list[str] | None, param(
        "Tags", "Labels stored in the backup's manifest. Empty: none.")] = None,
    wal_timeout_seconds: Annotated[float, param(
        "WAL wait (s)", "How long to wait for the backup's last WAL file to reach the store before failing. "
        "300 by default.", ge=1)] = 300,
    manifest_checksums: Annotated[Literal["CRC32C", "SHA256"], param(
        "Manifest checksums", "Per-file checksums in backup_manifest. CRC32C (default): pg_verifybackup "
        "checks them on restore. SHA256: verify also checks every file's content; costs the server ~0.6 CPU "
        "s per GiB.")] = "CRC32C",
    use_pg_basebackup: Annotated[bool, param(
        "Use pg_basebackup", "Run pg_basebackup and read its stdout, rather than reading BASE_BACKUP off a "
        "replication connection (PostgreSQL 15+; older servers always use pg_basebackup). Off by "
        "default.")] = False,
    compression_level: Annotated[int, param(
        "Compression level", "zstd level 1-19. 1 (default) keeps up with the server.", ge=1, le=19)] = 1,
    compression_threads: Annotated[int, param(
        "Compression threads", "zstd worker threads, 0-64. 2 by default.", ge=0, le=64)] = 2,
) -> PitrBackupResult:
    """Physical base backup for point-in-time recovery, after checking WAL archiving works end to end."""
    if (refused := refused_at_start()) is not None:  # an alert's approval form said reject
        return refused
    log = run_logger()
    store = store or BackupStore.from_url(DEFAULT_STORE)
    started = time.monotonic()
    started_at = datetime.now(UTC)
    status = check_pitr_ready(postgres, store)
    set_id = new_set_id()
    log.info("PITR base backup %s of %s into %s", set_id, postgres.describe(), store.describe())
    try:
        taken = take_base_backup(postgres, store, set_id, level=compression_level, threads=compression_threads,
                                 manifest_checksums=manifest_checksums, use_pg_basebackup=use_pg_basebackup)
        segments = wait_for_backup_wal(store, timeline=taken.timeline, start_lsn=taken.start_lsn,
                                       stop_lsn=taken.stop_lsn, segment_size=status.segment_size,
                                       timeout_seconds=wal_timeout_seconds)
        verified = verify_base_backup(store, taken.parts[0], taken.parts[1]) if verify else None
        start_seg = segment_of_lsn(parse_lsn(taken.start_lsn), status.segment_size)
        stop_seg = segment_of_lsn(parse_lsn(taken.stop_lsn), status.segment_size)
        manifest = build_manifest(
            set_id, taken.parts, started_at=started_at, completed_at=datetime.now(UTC),
            tags=["pitr-base", *(tags or [])], source={"postgres": f"{postgres.describe()} (PostgreSQL "
                                                                    f"{status.server_version})"},
            runbooks_version=runbooks_version(), flow_run_id=str(current_run.id or ""),
        ).model_copy(update={"pitr": PhysicalBackup(
            timeline=taken.timeline, start_lsn=taken.start_lsn, checkpoint_lsn=taken.checkpoint_lsn,
            stop_lsn=taken.stop_lsn, start_wal=segment_name(taken.timeline, start_seg, status.segment_size),
            stop_wal=segment_name(taken.timeline, stop_seg, status.segment_size), stop_time=taken.stop_time,
            system_identifier=status.system_identifier, server_version=status.server_version,
            segment_size=status.segment_size, archive_command=status.archive_command, files=taken.files,
            files_verified=verified is not None)})
        write_manifest(store, manifest)
    except BaseException:
        log.error("PITR base backup %s failed; discarding its parts so it is never listed", set_id)
        discard_incomplete_set(store, set_id)
        raise
    expired: list[str] = []
    if keep_last is not None:
        expired = expire_pitr_backups(store, keep_last=keep_last, keep_within_days=keep_within_days).expired
    seconds = round(time.monotonic() - started, 1)
    result = PitrBackupResult(
        set_id=set_id, store=store.describe(), timeline=taken.timeline, start_lsn=taken.start_lsn,
        stop_lsn=taken.stop_lsn, wal_segments=len(segments), size=manifest.size, raw_size=manifest.raw_size,
        files=taken.files, files_verified=verified is not None, seconds=seconds, backup_seconds=taken.seconds,
        expired=expired)
    create_markdown_artifact("\n".join([
        f"# PITR base backup `{set_id}`",
        "",
        f"- source: `{postgres.describe()}`, PostgreSQL {status.server_version}, timeline {taken.timeline}",
        f"- store: `{store.describe()}`",
        f"- WAL {taken.start_lsn} .. {taken.stop_lsn} ({len(segments)} segments, all archived)",
        f"- {taken.files} files, {human_size(manifest.raw_size)} raw, {human_size(manifest.size)} stored, "
        f"backup {taken.seconds:.1f} s, total {seconds:.1f} s",
        f"- files checked against backup_manifest: "
        f"{verified.compared if verified else 'no (verify=false)'} ({manifest_checksums} manifest)",
        f"- expired: {', '.join(expired) or '-'}",
    ]), key="pitr-base-backup", description=f"PITR base backup {set_id}")
    return result


class PitrRestoreResult(BaseModel):
    set_id: str
    target: str
    data_dir: str
    port: int
    state: str
    stopped_at: str | None
    timeline: int | None
    redo_done_lsn: str | None
    last_transaction_time: str | None
    wal_segments_planned: int
    notes: list[str]
    seconds: float
    extract_seconds: float
    recovery_seconds: float


@flow(name="pitr-restore", log_prints=False, **runbook_metrics_hooks())
def pitr_restore(
    store: Annotated[BackupStore, param(
        "Backup store", "The store holding the base backups and the WAL archive.")],
    target_dir: Annotated[str, param(
        "New cluster directory", "A NEW directory for the restored cluster: PGDATA is <target_dir>/data, its "
        "log <target_dir>/server.log. An existing non-empty directory is refused.")],
    port: Annotated[int, param(
        "Port", "A free port; the restored cluster listens on 127.0.0.1.", ge=1, le=65535)],
    target: Annotated[Literal["latest", "time", "lsn", "name", "immediate"], param(
        "Restore to", "latest (default): the end of the archive. time / lsn / name: the point given below. "
        "immediate: the end of the base backup.")] = "latest",
    target_time: Annotated[datetime | None, param(
        "Target time", "target=time: the moment to restore to, with a time zone. Empty otherwise.")] = None,
    target_lsn: Annotated[str | None, param(
        "Target LSN", "target=lsn: e.g. 0/5000060. Empty otherwise.")] = None,
    target_name: Annotated[str | None, param(
        "Target restore point", "target=name: a restore point's name. Empty otherwise.")] = None,
    inclusive: Annotated[bool, param(
        "Include the target", "Stop just after (on, default) or just before the target.")] = True,
    timeline: Annotated[str, param(
        "Timeline", "latest (default), current (the backup's) or a timeline number.")] = "latest",
    backup_id: Annotated[str | None, param(
        "Base backup", "A base backup id. Empty (default): the newest base backup before the target.")] = None,
    action: Annotated[Literal["promote", "pause"], param(
        "At the target", "promote (default): the cluster opens for writes. pause: it stays read-only in "
        "recovery, for inspection.")] = "promote",
    keep_archiving: Annotated[bool, param(
        "Keep archiving", "After promotion, archive the new timeline as the source did. On by default; off: "
        "archive_mode=off.")] = True,
    restore_command: Annotated[list[str] | None, param(
        "restore_command (argv)", "argv of this project's wal-fetch: [runbooks, wal-fetch, --config, FILE, "
        "%f, %p]; %f/%p are the only placeholders and no word may hold shell syntax. Empty (default): the "
        "source's archive_command with wal-push -> wal-fetch.")] = None,
    os_user: Annotated[str, param(
        "OS user", "The operating-system user the cluster runs as. postgres by default.")] = "postgres",
    timeout_seconds: Annotated[float, param(
        "Timeout (s)", "Give up when recovery has not reached the target within this time. 3600 by "
        "default.", ge=10)] = 3600,
) -> PitrRestoreResult:
    """Restore a new cluster to a point in time; it stays running on ``port`` for inspection or a swap."""
    if (refused := refused_at_start()) is not None:  # an alert's approval form said reject
        return refused
    log = run_logger()
    started = time.monotonic()
    wanted = RecoveryTarget(target, time=target_time, lsn=parse_lsn(target_lsn) if target_lsn else None,
                            name=target_name, inclusive=inclusive)
    explicit = restore_command_argv(restore_command) if restore_command else None
    check_restore_target(target_dir, port, os_user=os_user)
    plan = plan_restore(store, wanted, backup_id=backup_id, timeline=timeline)
    command = explicit or restore_command_for(plan.archive_command)
    if wanted.kind == "name" and plan.restore_point_lsn is None:
        log.warning("restore point %r is not recorded in the store: the newest base backup is used, and recovery "
                    "stops at the first restore point of that name after it", target_name)
    settings = recovery_settings(wanted, restore_command=restore_command_line(command), timeline=timeline,
                                 action=action)
    extracted = extract_base_backup(store, plan.tar_part, target_dir, os_user=os_user)
    verify_restored_files(extracted.data_dir)
    notes = configure_recovery(target_dir, settings, port=port, keep_archiving=keep_archiving, os_user=os_user)
    check_restore_command(command, extracted.data_dir, plan.first_segment, os_user=os_user)
    recovery_started = time.monotonic()
    start_restored_cluster(target_dir, port, timeout_seconds=timeout_seconds, gap=plan.gap)
    outcome = wait_for_recovery(target_dir, action=action, timeout_seconds=timeout_seconds, gap=plan.gap)
    recovery_seconds = round(time.monotonic() - recovery_started, 3)
    problems = target_problems(outcome, wanted, plan)
    if problems:
        raise RestoreFailed(f"restore into {extracted.data_dir} did not reach {wanted.describe()}: "
                            + "; ".join(problems) + f". The cluster is left {outcome.state} on port {port}.")
    seconds = round(time.monotonic() - started, 1)
    result = PitrRestoreResult(
        set_id=plan.set_id, target=wanted.describe(), data_dir=extracted.data_dir, port=port, state=outcome.state,
        stopped_at=outcome.stopped_at, timeline=outcome.timeline, redo_done_lsn=outcome.redo_done_lsn,
        last_transaction_time=outcome.last_transaction_time, wal_segments_planned=plan.segments, notes=notes,
        seconds=seconds, extract_seconds=extracted.seconds, recovery_seconds=recovery_seconds)
    create_markdown_artifact("\n".join([
        f"# PITR restore to {wanted.describe()}",
        "",
        f"- base backup `{plan.set_id}` (timeline {plan.backup_timeline}, WAL from {plan.start_lsn}), "
        f"target timeline {plan.target_timeline}",
        f"- new cluster: `{extracted.data_dir}` on 127.0.0.1:{port}, {outcome.state}"
        + (f" on timeline {outcome.timeline}" if outcome.timeline else ""),
        f"- recovery stopped {outcome.stopped_at or 'at the end of the archive'}; redo done at "
        f"{outcome.redo_done_lsn}; last transaction {outcome.last_transaction_time or '-'}",
        f"- {extracted.files} files ({human_size(extracted.bytes)}) verified by pg_verifybackup; "
        f"extract {extracted.seconds:.1f} s, recovery {result.recovery_seconds:.1f} s, total {seconds:.1f} s",
        *[f"- note: {n}" for n in notes],
    ]), key="pitr-restore", description=f"PITR restore into {target_dir}")
    return result

