"""Planning a restore before anything is written: which base backup, which timeline, which WAL."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from blocks.errors import BackupNotFound, ConfigurationError, StoreError, WalMissing
from blocks.store import BackupStore, StoreClient
from tasks.log import run_logger
from tasks.manifest import Manifest, Part
from tasks.pitr.restore_points import find_restore_point
from tasks.retry import retry_unless_permanent
from tasks.store import list_sets
from tasks.wal import (
    WAL_PREFIX,
    BaseBackupRef,
    RecoveryTarget,
    WalChain,
    backups_before,
    format_lsn,
    history_name,
    name_of_key,
    newest_timeline,
    on_path,
    parse_history,
    parse_lsn,
    plan_chain,
    timeline_path,
    wal_key,
)


def base_backups(client: StoreClient) -> list[Manifest]:
    """Complete physical base backups in the store, oldest first."""
    return [m for m in list_sets(client) if m.pitr is not None]


def backup_ref(manifest: Manifest) -> BaseBackupRef:
    assert manifest.pitr is not None
    info = manifest.pitr
    return BaseBackupRef(set_id=manifest.set_id, timeline=info.timeline, start_lsn=parse_lsn(info.start_lsn),
                         stop_lsn=parse_lsn(info.stop_lsn), stop_time=info.stop_time, segment_size=info.segment_size)


def read_history(client: StoreClient, timeline: int) -> str | None:
    """A timeline history file from the archive, or None."""
    import zstandard

    key = wal_key(history_name(timeline))
    try:
        data = client.get_bytes(key)
    except StoreError:
        if client.exists(key):
            raise
        return None
    return zstandard.ZstdDecompressor().decompressobj().decompress(data).decode()


class RestorePlan(BaseModel):
    """What a restore will do, decided before anything is written."""

    set_id: str
    target: str
    backup_timeline: int
    target_timeline: int
    start_lsn: str
    stop_lsn: str
    segment_size: int
    first_segment: str
    last_segment: str | None = Field(description="Newest archived segment on the way (None: a gap first).")
    segments: int
    gap: str | None = Field(description="First segment missing from the chain; recovery stops before it.")
    restore_point_lsn: str | None = None
    archive_command: str
    server_version: str
    tar_part: Part


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_unless_permanent)
def plan_restore(
    store: BackupStore, target: RecoveryTarget, *, backup_id: str | None = None, timeline: str = "latest",
) -> RestorePlan:
    """Choose the base backup (default: the newest that ended before the target), the target timeline, and
    check the WAL chain; a segment missing where recovery must pass is refused here, before any change."""
    client = store.get_client()
    manifests = {m.set_id: m for m in base_backups(client)}
    if not manifests:
        raise BackupNotFound(f"no complete base backup in {client.description}: run pitr-base-backup first")
    point = find_restore_point(client, target.name) if target.kind == "name" and target.name else None
    known_lsn = parse_lsn(point.lsn) if point else None
    if backup_id is not None:
        if backup_id not in manifests:
            raise BackupNotFound(f"no base backup {backup_id!r} in {client.description}; there are "
                                 f"{sorted(manifests)}")
        candidates = [backup_ref(manifests[backup_id])]
    else:
        candidates = backups_before([backup_ref(m) for m in manifests.values()], target, known_lsn)
        if not candidates:
            raise BackupNotFound(f"no base backup in {client.description} ended before {target.describe()}; the "
                                 f"oldest ended at {min(m.pitr.stop_time for m in manifests.values() if m.pitr)}")
    histories: dict[int, str] = {}

    def history(tli: int) -> str | None:
        if tli not in histories:
            text = read_history(client, tli)
            if text is None:
                return None
            histories[tli] = text
        return histories[tli]

    refusals = []
    archived = {n for n in (name_of_key(o.key) for o in client.list(WAL_PREFIX)) if n}
    for ref in candidates:
        if timeline == "current":
            target_tli = ref.timeline
        elif timeline == "latest":
            probed = []
            tli = ref.timeline
            while history(tli + 1) is not None:
                tli += 1
                probed.append(tli)
            target_tli = newest_timeline(ref.timeline, probed)
        else:
            target_tli = int(timeline)
        text = history(target_tli) if target_tli > 1 else ""
        if text is None:
            raise ConfigurationError(f"timeline {target_tli} has no history file in {client.description}")
        spans = timeline_path(target_tli, parse_history(text or ""))
        if not on_path(spans, ref.timeline, ref.start_lsn):
            refusals.append(f"{ref.set_id} (timeline {ref.timeline} at {format_lsn(ref.start_lsn)}) is not on the "
                            f"history of timeline {target_tli}")
            continue
        own = plan_chain(spans, ref.start_lsn, archived, stop_lsn=ref.stop_lsn, segment_size=ref.segment_size)
        if own.missing:
            raise WalMissing(f"WAL segment {own.missing} is missing from {client.description}: base backup "
                             f"{ref.set_id} needs it to become consistent; nothing was restored")
        stop = target.lsn if target.kind == "lsn" else known_lsn if target.kind == "name" else None
        chain: WalChain = plan_chain(spans, ref.start_lsn, archived, stop_lsn=stop, segment_size=ref.segment_size)
        # Where a time (or an unrecorded restore point) falls is unknown until replay: a gap is then only
        # reported if recovery does not reach the target before it.
        if chain.missing and (target.kind in ("latest", "lsn") or (target.kind == "name" and known_lsn)):
            raise WalMissing(f"WAL segment {chain.missing} is missing from {client.description}: recovery from "
                             f"{ref.set_id} to {target.describe()} would stop there"
                             + (f" with {chain.after_gap} later segments unreachable" if chain.after_gap else "")
                             + "; nothing was restored")
        manifest = manifests[ref.set_id]
        assert manifest.pitr is not None
        plan = RestorePlan(
            set_id=ref.set_id, target=target.describe(), backup_timeline=ref.timeline, target_timeline=target_tli,
            start_lsn=format_lsn(ref.start_lsn), stop_lsn=format_lsn(ref.stop_lsn), segment_size=ref.segment_size,
            first_segment=chain.first, last_segment=chain.last, segments=chain.segments, gap=chain.missing,
            restore_point_lsn=point.lsn if point else None, archive_command=manifest.pitr.archive_command,
            server_version=manifest.pitr.server_version, tar_part=_tar_part(manifest))
        run_logger().info("restore plan: base backup %s, %s, timeline %d, WAL %s..%s (%d segments)", plan.set_id,
                          plan.target, target_tli, plan.first_segment, plan.last_segment or plan.gap, plan.segments)
        return plan
    raise ConfigurationError("no base backup fits: " + "; ".join(refusals) + ". Choose timeline='current' or "
                             "a timeline number, or a backup_id")


def _tar_part(manifest: Manifest) -> Part:
    part = manifest.part("pgbase", "base.tar")
    if part is None:
        raise ConfigurationError(f"set {manifest.set_id} holds no base.tar")
    return part
