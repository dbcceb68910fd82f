"""Point-in-time recovery steps: check a server is ready for PITR, take a physical base backup into the
store and verify it, create restore points; restore a base backup into a new cluster and replay archived
WAL to a time, an LSN, a restore point or the end of the archive; expire base backups and the WAL only
they needed.

Each task does one side-effecting step and returns a small typed value; the choices (which backup, which
WAL, which settings) are the pure functions of tasks/wal.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import tarfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from blocks.postgres import PostgresConnection
from blocks.store import BackupStore, StoreClient
from tasks.errors import (
    BackupNotFound,
    BaseBackupFailed,
    ChecksumMismatch,
    ConfigurationError,
    PreflightFailed,
    RestoreFailed,
    StoreError,
    VerificationFailed,
    WalMissing,
)
from tasks.log import run_logger
from tasks.manifest import (
    BACKUP_MANIFEST,
    Manifest,
    Part,
    RestorePointRecord,
    base_backup_key,
    encode_name,
    human_size,
    manifest_key,
    set_prefix,
)
from tasks.process import describe_exit, pg_tool, run, spawn, tool_version
from tasks.retry import retry_transient
from tasks.scratch import LOOPBACK, ScratchPostgres
from tasks.store import list_sets
from tasks.stream import CHUNK, StreamResult, compress_into_store, open_compressed_writer, open_decompressed_reader
from tasks.wal import (
    CLUSTER_KEY,
    RESTORE_POINTS_PREFIX,
    WAL_PREFIX,
    BaseBackupRef,
    RecoveryLog,
    RecoveryTarget,
    WalChain,
    backups_before,
    format_lsn,
    history_name,
    label_start,
    name_of_key,
    newest_timeline,
    on_path,
    parse_backup_label,
    parse_history,
    parse_lsn,
    parse_recovery_log,
    parse_wal_name,
    plan_chain,
    plan_pitr_retention,
    restore_command_argv,
    segment_name,
    segment_of_lsn,
    timeline_path,
    wal_key,
)


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_transient``, and never after a failed restore check (a missing WAL segment stays missing)."""
    try:
        state.result()
    except RestoreFailed:
        return False
    except Exception:  # noqa: BLE001 - judged by retry_transient below
        pass
    return retry_transient(task, task_run, state)


# ------------------------------------------------------------------------------------ tar, in passing


class TarStream:
    """Follows a tar byte stream as it flows past (no seeking): member names and sizes, the content of a
    few small members, and optionally a sha256 of every member. PostgreSQL writes plain ustar members."""

    def __init__(self, capture: tuple[str, ...] = (), *, hash_members: bool = False) -> None:
        self.capture = set(capture)
        self.hash_members = hash_members
        self.captured: dict[str, bytes] = {}
        self.files: dict[str, tuple[int, str | None]] = {}  # regular files: size, sha256
        self.ended = False
        self._header = bytearray()
        self._remaining = 0
        self._padding = 0
        self._name = ""
        self._size = 0
        self._regular = False
        self._hasher: Any = None
        self._buffer: bytearray | None = None
        self._long_name: str | None = None
        self._long_kind = False  # the member is a GNU long-name record for the next one
        self._zero_blocks = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._remaining:
                take = min(self._remaining, end - pos)
                chunk = view[pos:pos + take]
                if self._hasher is not None:
                    self._hasher.update(chunk)
                if self._buffer is not None:
                    self._buffer += chunk
                self._remaining -= take
                pos += take
                if not self._remaining:
                    self._end_member()
            elif self._padding:
                take = min(self._padding, end - pos)
                self._padding -= take
                pos += take
            else:
                take = min(512 - len(self._header), end - pos)
                self._header += view[pos:pos + take]
                pos += take
                if len(self._header) == 512:
                    header, self._header = bytes(self._header), bytearray()
                    self._start_member(header)

    def _start_member(self, header: bytes) -> None:
        if header == b"\0" * 512:
            self._zero_blocks += 1
            self.ended = self._zero_blocks >= 2
            return
        if self.ended:
            raise ChecksumMismatch("tar stream has data after its end")
        self._zero_blocks = 0
        name = header[0:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
        if prefix:
            name = f"{prefix}/{name}"
        if self._long_name is not None:
            name, self._long_name = self._long_name, None
        size_field = header[124:136]
        if size_field[0] & 0x80:  # base-256, for members of 8 GiB and more
            size = int.from_bytes(size_field[1:], "big")
        else:
            text = size_field.split(b"\0", 1)[0].strip()
            size = int(text, 8) if text else 0
        kind = header[156:157]
        self._name, self._size = name.rstrip("/"), size
        self._regular = kind in (b"0", b"\0", b"7")
        wanted = self._name in self.capture or kind == b"L"
        self._hasher = hashlib.sha256() if self._regular and self.hash_members else None
        self._buffer = bytearray() if wanted else None
        self._long_kind = kind == b"L"
        self._remaining = size
        self._padding = (-size) % 512
        if size == 0:
            self._end_member()

    def _end_member(self) -> None:
        if self._long_kind:
            assert self._buffer is not None
            self._long_name = bytes(self._buffer).split(b"\0", 1)[0].decode()
            self._buffer = None
            return
        if self._regular:
            self.files[self._name] = (self._size, self._hasher.hexdigest() if self._hasher else None)
        if self._buffer is not None:
            self.captured[self._name] = bytes(self._buffer)
        self._buffer = None
        self._hasher = None


def check_backup_manifest(text: bytes, files: dict[str, tuple[int, str | None]]) -> list[str]:
    """Differences between PostgreSQL's backup_manifest and the files a tar holds (with their sha256)."""
    manifest = json.loads(text)
    problems = []
    checksum_at = text.rfind(b'"Manifest-Checksum"')
    if checksum_at < 0 or hashlib.sha256(text[:checksum_at]).hexdigest() != manifest.get("Manifest-Checksum"):
        problems.append("backup_manifest: its own checksum does not match")
    listed = {entry["Path"]: entry for entry in manifest.get("Files", [])}
    for path, entry in listed.items():
        have = files.get(path)
        if have is None:
            problems.append(f"{path}: in backup_manifest, not in the backup")
            continue
        size, sha = have
        if size != entry["Size"]:
            problems.append(f"{path}: {size} bytes, backup_manifest says {entry['Size']}")
        elif entry.get("Checksum-Algorithm") == "SHA256" and sha is not None and sha != entry["Checksum"]:
            problems.append(f"{path}: sha256 differs from backup_manifest")
    for path in sorted(set(files) - set(listed) - {BACKUP_MANIFEST}):
        problems.append(f"{path}: in the backup, not in backup_manifest")
    return problems


# ---------------------------------------------------------------------------------------- preflight


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


# ---------------------------------------------------------------------------------------- base backup


class BaseBackupTaken(BaseModel):
    """The stored tar and backup_manifest of one base backup, and where it sits in the WAL."""

    parts: list[Part]
    timeline: int
    start_lsn: str
    checkpoint_lsn: str
    stop_lsn: str
    stop_time: datetime
    files: int
    seconds: float


# The per-file checksum pg_basebackup writes into backup_manifest. CRC32C (PostgreSQL's default) is nearly
# free for the server and is checked by pg_verifybackup on every restore; SHA256 costs the server about
# 0.6 CPU seconds per GiB (docs/pitr.md) and lets verify_base_backup also check each file's content.
MANIFEST_CHECKSUMS = ("CRC32C", "SHA256")


_TAR_END = b"\0" * 1024  # two zero blocks end a tar


def _pg_basebackup_chunks(child: Any, target: str) -> Iterator[memoryview]:
    """pg_basebackup's stdout in 1 MiB chunks (one buffer, reused); raises at EOF unless the tool exited 0."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    while count := child.stdout.readinto(view):
        yield view[:count]
    code = child.wait()
    if code != 0:
        raise BaseBackupFailed(f"pg_basebackup of {target} failed ({describe_exit(code)}): {child.stderr_tail()}")


class _ReplicationBaseBackup:
    """``BASE_BACKUP`` over a replication connection (PostgreSQL 15+), read with libpq: the tar that
    ``pg_basebackup -Ft -D - -X none`` writes (the server's archive, backup_manifest as its last member, the
    end blocks), without a pg_basebackup process and a pipe in between (pg_basebackup spends ~1.1 CPU
    seconds per GiB on that; reading the connection here takes ~0.2 of it back; docs/pitr.md).

    The server sends the archive (ending with the two zero blocks) and then backup_manifest separately; the
    last 1 KiB is held back so the manifest can go in before the end blocks, as pg_basebackup does. Its
    messages (32 KiB) are passed on as libpq returns them: gathering them into bigger chunks costs a copy
    of every byte and saves less than that.
    """

    def __init__(self, conn: Any, target: str, command: str) -> None:
        self.conn = conn
        self.target = target
        self.command = command

    def _wait(self) -> None:
        import select

        import psycopg

        select.select([self.conn.pgconn.socket], [], [])
        try:
            self.conn.pgconn.consume_input()
        except psycopg.OperationalError as exc:  # the connection broke: a retry starts over
            raise self._failed(str(exc)) from None

    def _result(self) -> Any:
        """The next result (None after the last); waits without holding the GIL, so uploads go on."""
        from psycopg import pq

        pgconn = self.conn.pgconn
        while pgconn.is_busy():
            self._wait()
        result = pgconn.get_result()
        if result is not None and result.status == pq.ExecStatus.FATAL_ERROR:
            raise self._failed(result.error_message)
        return result

    def _failed(self, message: bytes | str) -> BaseBackupFailed:
        text = message.decode(errors="replace") if isinstance(message, bytes) else message
        return BaseBackupFailed(f"base backup of {self.target} failed: {text.strip()}")

    def chunks(self) -> Iterator[bytes | memoryview]:
        from psycopg import pq

        pgconn = self.conn.pgconn
        pgconn.send_query(self.command.encode())
        while (result := self._result()) is not None and result.status != pq.ExecStatus.COPY_OUT:
            if result.nfields and result.fname(0) == b"spcoid" and result.ntuples > 1:
                raise BaseBackupFailed(f"{self.target} has {result.ntuples - 1} tablespace(s) outside the data "
                                       "directory: a streamed base backup holds the data directory only")
        if result is None:
            raise self._failed(pgconn.error_message or b"the server sent no backup")
        held: list[memoryview] = []  # the archive's last messages, at least 1 KiB once there are that many
        held_size = 0
        manifest = bytearray()
        in_manifest = False
        while True:
            count, data = pgconn.get_copy_data(1)
            if count == 0:
                self._wait()
                continue
            if count == -1:
                break
            if count < 0:
                raise self._failed(pgconn.error_message)
            kind = data[0]
            if kind == 0x64:  # 'd': archive or manifest bytes
                if in_manifest:
                    manifest += data[1:]
                    continue
                held.append(data[1:])
                held_size += count - 1
                while held_size - len(held[0]) >= len(_TAR_END):
                    held_size -= len(held[0])
                    yield held.pop(0)
            elif kind == 0x6E and held_size:  # 'n': a second archive, i.e. a tablespace
                raise BaseBackupFailed(f"{self.target} sent more than one archive: tablespaces are not supported")
            elif kind == 0x6D:  # 'm': backup_manifest follows
                in_manifest = True
        while self._result() is not None:  # the stop position, then the command's completion
            pass
        tail = b"".join(held)
        if not tail.endswith(_TAR_END) or not manifest:
            raise BaseBackupFailed(f"base backup of {self.target} ended without a complete tar and backup_manifest")
        yield tail[: -len(_TAR_END)]
        member = tarfile.TarInfo(BACKUP_MANIFEST)
        member.size, member.mode, member.mtime = len(manifest), 0o600, int(time.time())
        yield member.tobuf(format=tarfile.USTAR_FORMAT) + bytes(manifest) + b"\0" * (-len(manifest) % 512)
        yield _TAR_END


@task(retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def take_base_backup(
    pg: PostgresConnection, store: BackupStore, set_id: str, *, level: int = 1, threads: int = 2,
    manifest_checksums: str = "CRC32C", use_pg_basebackup: bool = False,
) -> BaseBackupTaken:
    """The tar of ``pg_basebackup -Ft -D - -X none --checkpoint=fast`` streamed through zstd and sha256 into
    the store, with its backup_manifest beside it (per-file checksums: ``manifest_checksums``).

    From PostgreSQL 15 on the tar is read straight off a replication connection; ``use_pg_basebackup`` (and
    any older server) runs pg_basebackup and reads its stdout instead. WAL is not copied into the backup:
    the archive holds it, and ``wait_for_backup_wal`` checks it is there (the backup is not usable before).
    """
    if manifest_checksums not in MANIFEST_CHECKSUMS:
        raise ConfigurationError(f"manifest_checksums={manifest_checksums!r}: use "
                                 + " or ".join(MANIFEST_CHECKSUMS))
    log = run_logger()
    client = store.get_client()
    key = base_backup_key(set_id)
    label = f"runbooks {set_id}"
    started = time.monotonic()
    tar = TarStream(capture=("backup_label", BACKUP_MANIFEST))
    with ExitStack() as stack:
        conn = None if use_pg_basebackup else stack.enter_context(pg.connect(replication="true", autocommit=True))
        if conn is not None and conn.info.server_version >= 150000:
            # WAIT false: the server would wait for its last segment to be archived, checking once a second;
            # wait_for_backup_wal checks the store itself, more often (pg_basebackup -X none always waits).
            command = (f"BASE_BACKUP (LABEL '{label.replace(chr(39), chr(39) * 2)}', CHECKPOINT 'fast', "
                       f"MANIFEST 'yes', MANIFEST_CHECKSUMS '{manifest_checksums}', WAIT false)")
            chunks: Iterator[bytes | memoryview] = _ReplicationBaseBackup(conn, pg.describe(), command).chunks()
            tool = "BASE_BACKUP (replication protocol)"
            version = f"PostgreSQL {conn.info.parameter_status('server_version')}"
        else:  # older servers speak another BASE_BACKUP protocol: pg_basebackup knows them all
            stack.close()
            executable = pg_tool("pg_basebackup")
            argv = [executable, "--format=tar", "--pgdata=-", "--wal-method=none", "--checkpoint=fast",
                    f"--manifest-checksums={manifest_checksums}", f"--label={label}", "--no-password"]
            child = stack.enter_context(spawn(argv, env=pg.libpq_env()))
            chunks = _pg_basebackup_chunks(child, pg.describe())
            tool, version = "pg_basebackup -Ft -X none", tool_version(executable)
        log.info("base backup of %s into %s (%s)", pg.describe(), key, tool)
        result: list[StreamResult] = []
        with open_compressed_writer(client, key, level=level, threads=threads, result=result) as writer:
            for chunk in chunks:
                tar.feed(chunk)
                writer.write(chunk)
            if not tar.ended or "backup_label" not in tar.captured or BACKUP_MANIFEST not in tar.captured:
                raise BaseBackupFailed(f"base backup of {pg.describe()} ended without a complete tar, backup_label "
                                       "and backup_manifest; nothing was stored")
        stored = result[0]
    with pg.connect(autocommit=True) as conn:
        stop_time = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    manifest_text = tar.captured[BACKUP_MANIFEST]
    manifest_stored = compress_into_store(client, base_backup_key(set_id, BACKUP_MANIFEST),
                                          io.BytesIO(manifest_text), level=3, threads=0)
    start, checkpoint, timeline = label_start(parse_backup_label(tar.captured["backup_label"].decode()))
    ranges = json.loads(manifest_text).get("WAL-Ranges") or []
    if not ranges:
        raise BaseBackupFailed(f"backup_manifest of {set_id} lists no WAL range")
    stop = parse_lsn(ranges[-1]["End-LSN"])
    seconds = round(time.monotonic() - started, 3)
    parts = [
        Part(kind="pgbase", name="base.tar", key=key, size=stored.size, raw_size=stored.raw_size,
             sha256=stored.sha256, compression_level=level,
             tool=f"{tool} --manifest-checksums={manifest_checksums}",
             tool_version=version, seconds=seconds),
        Part(kind="pgbase", name=BACKUP_MANIFEST, key=base_backup_key(set_id, BACKUP_MANIFEST),
             size=manifest_stored.size, raw_size=manifest_stored.raw_size, sha256=manifest_stored.sha256,
             compression_level=3, tool=tool, tool_version=version),
    ]
    files = len(json.loads(manifest_text).get("Files", []))
    log.info("base backup of %s: %s -> %s stored in %.1f s; WAL %s..%s on timeline %d", pg.describe(),
             human_size(stored.raw_size), human_size(stored.size), seconds, format_lsn(start), format_lsn(stop),
             timeline)
    return BaseBackupTaken(parts=parts, timeline=timeline, start_lsn=format_lsn(start),
                           checkpoint_lsn=format_lsn(checkpoint), stop_lsn=format_lsn(stop), stop_time=stop_time,
                           files=files, seconds=seconds)


@task(retries=0, cache_policy=NO_CACHE)
def wait_for_backup_wal(
    store: BackupStore, *, timeline: int, start_lsn: str, stop_lsn: str, segment_size: int,
    timeout_seconds: float = 300,
) -> list[str]:
    """Wait until every segment from the backup's start to its stop is in the store; returns their names.

    A base backup without that WAL cannot become consistent, so no manifest is written without it. The
    store is asked at once, then every 50 ms growing to 1 s: the last segment usually lands within a
    fraction of a second (PostgreSQL's own wait checks once a second).
    """
    client = store.get_client()
    first, last = segment_of_lsn(parse_lsn(start_lsn), segment_size), segment_of_lsn(parse_lsn(stop_lsn),
                                                                                     segment_size)
    needed = [segment_name(timeline, n, segment_size) for n in range(first, last + 1)]
    deadline = time.monotonic() + timeout_seconds
    pause = 0.05
    missing = list(needed)
    while True:
        missing = [n for n in missing if not client.exists(wal_key(n))]
        if not missing:
            run_logger().info("WAL %s..%s of the base backup is in %s", needed[0], needed[-1], client.description)
            return needed
        if time.monotonic() > deadline:
            raise BaseBackupFailed(f"WAL segment {missing[0]} (needed to make the base backup consistent) did not "
                                   f"reach {client.description} within {timeout_seconds:.0f} s: is archiving "
                                   "failing? (pg_stat_archiver, server log). No manifest was written.")
        time.sleep(pause)
        pause = min(pause * 1.5, 1.0)


class FilesVerified(BaseModel):
    files: int
    bytes: int
    compared: str = Field(description="What was compared per file: 'size and sha256', or 'size' (a CRC32C "
                                      "manifest, whose checksums pg_verifybackup checks on restore).")
    seconds: float


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def verify_base_backup(store: BackupStore, tar_part: Part, manifest_part: Part) -> FilesVerified:
    """Read the stored backup back: its sha256 and zstd checksum, the manifest's own checksum, and every
    file against backup_manifest: its size, and its sha256 when the manifest has SHA256 checksums."""
    started = time.monotonic()
    client = store.get_client()
    with open_decompressed_reader(client, manifest_part.key, sha256=manifest_part.sha256,
                                  size=manifest_part.size) as src:
        manifest_text = src.read()
    # CRC32C has no fast implementation in Python's standard library; pg_verifybackup checks it on restore.
    sha256_listed = any(f.get("Checksum-Algorithm") == "SHA256" for f in json.loads(manifest_text).get("Files", []))
    tar = TarStream(hash_members=sha256_listed)
    with open_decompressed_reader(client, tar_part.key, sha256=tar_part.sha256, size=tar_part.size) as src:
        while chunk := src.read(CHUNK):
            tar.feed(chunk)
    problems = check_backup_manifest(manifest_text, tar.files)
    if not tar.ended:
        problems.insert(0, "the tar ends early")
    if problems:
        raise VerificationFailed(f"base backup {tar_part.key} in {client.description}: " + "; ".join(problems[:10]))
    total = sum(size for size, _ in tar.files.values())
    seconds = round(time.monotonic() - started, 3)
    compared = "size and sha256" if sha256_listed else "size"
    run_logger().info("verified %d files (%s) of %s against backup_manifest (%s) in %.1f s", len(tar.files),
                      human_size(total), tar_part.key, compared, seconds)
    return FilesVerified(files=len(tar.files), bytes=total, compared=compared, seconds=seconds)


# ------------------------------------------------------------------------------------- restore points


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


# ------------------------------------------------------------------------------------------ restoring


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


_OS_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def check_os_user(name: str) -> str:
    """An existing OS account with a plain POSIX name (it reaches ``runuser -u`` and chown)."""
    import pwd

    if not _OS_USER.match(name):
        raise ConfigurationError(f"os_user {name[:64]!r} is not a POSIX user name ([a-z_][a-z0-9_-]*); "
                                 "nothing was changed")
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise ConfigurationError(f"os_user {name!r} does not exist on this host; nothing was changed") from None
    return name


@task(retries=0, cache_policy=NO_CACHE)
def check_restore_target(target_dir: str, port: int, *, os_user: str = "postgres") -> str:
    """A restore never goes over anything: ``target_dir`` must be new or empty, ``port`` free on 127.0.0.1,
    ``os_user`` an existing account."""
    if any(ord(c) < 32 or ord(c) == 127 for c in target_dir):
        raise ConfigurationError(f"target_dir {target_dir[:200]!r} has control characters; nothing was changed")
    path = Path(target_dir)
    if not path.is_absolute() or ".." in path.parts:
        raise ConfigurationError(f"target_dir {target_dir!r} must be an absolute path without '..'")
    check_os_user(os_user)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigurationError(f"{target_dir} exists and is not empty: a restore only goes into a new directory "
                                 "(nothing was changed)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        if probe.connect_ex((LOOPBACK, port)) == 0:
            raise ConfigurationError(f"port {port} on {LOOPBACK} is in use: choose a free port (nothing was changed)")
    return str(path)


class Extracted(BaseModel):
    data_dir: str
    files: int
    bytes: int
    seconds: float


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE, retry_condition_fn=retry_unless_permanent)
def extract_base_backup(store: BackupStore, part: Part, target_dir: str, *, os_user: str = "postgres") -> Extracted:
    """Stream the base backup out of the store into ``target_dir/data`` (owned by ``os_user``, mode 0700).

    The stored sha256 is checked as the stream ends; on any failure the new data directory is removed.
    """
    started = time.monotonic()
    client = store.get_client()
    base = Path(target_dir)
    data = base / "data"
    base.mkdir(mode=0o755, parents=True, exist_ok=True)
    data.mkdir(mode=0o700)
    files = total = 0
    try:
        with open_decompressed_reader(client, part.key, sha256=part.sha256, size=part.size) as src, \
                tarfile.open(fileobj=src, mode="r|") as archive:
            for member in archive:
                if member.issym() or member.islnk():
                    raise RestoreFailed(f"{part.key}: holds a link ({member.name}); tablespaces are not supported")
                archive.extract(member, data, filter="data")
                if member.isfile():
                    files += 1
                    total += member.size
        for name in ("pg_wal/archive_status",):
            (data / name).mkdir(parents=True, exist_ok=True)
        (base / "socket").mkdir(exist_ok=True)
        if os.geteuid() == 0:
            for path in [base, base / "socket", *data.rglob("*"), data]:
                shutil.chown(path, os_user, os_user)
        data.chmod(0o700)
    except BaseException:
        shutil.rmtree(data, ignore_errors=True)
        raise
    seconds = round(time.monotonic() - started, 3)
    run_logger().info("extracted %s into %s: %d files, %s in %.1f s", part.key, data, files, human_size(total), seconds)
    return Extracted(data_dir=str(data), files=files, bytes=total, seconds=seconds)


@task(retries=0, cache_policy=NO_CACHE)
def verify_restored_files(data_dir: str) -> int:
    """``pg_verifybackup --no-parse-wal``: every file of the new data directory against backup_manifest."""
    code, out, err = run([pg_tool("pg_verifybackup"), "--no-parse-wal", data_dir], env={})
    if code != 0:
        raise VerificationFailed(f"pg_verifybackup of {data_dir} failed ({describe_exit(code)}): "
                                 f"{(err or out).strip()[-1500:]}")
    files = len(json.loads((Path(data_dir) / BACKUP_MANIFEST).read_text()).get("Files", []))
    run_logger().info("pg_verifybackup: %d files of %s match backup_manifest", files, data_dir)
    return files


def _conf_line(key: str, value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigurationError(f"{key}: a control character (e.g. a newline) cannot go into postgresql.auto.conf")
    return f"{key} = '" + value.replace("\\", "\\\\").replace("'", "''") + "'"


_MINIMAL_HBA = """# written by runbooks pitr-restore: the backup held no pg_hba.conf (it lived elsewhere)
local   all   all                 peer
host    all   all   127.0.0.1/32  scram-sha-256
"""


@task(retries=0, cache_policy=NO_CACHE)
def configure_recovery(
    target_dir: str, settings: dict[str, str], *, port: int, keep_archiving: bool = True, os_user: str = "postgres",
) -> list[str]:
    """Write the recovery settings, port, loopback address and a log we can read into postgresql.auto.conf
    (read last, so they win), and ``recovery.signal``. Returns notes on anything else that had to be added."""
    base = Path(target_dir)
    data = base / "data"
    notes = []
    if not (data / "postgresql.conf").exists():
        (data / "postgresql.conf").write_text("# written by runbooks pitr-restore: the backup held none\n")
        notes.append("the backup held no postgresql.conf (Debian keeps it in /etc): an empty one was written")
    if not (data / "pg_hba.conf").exists():
        (data / "pg_hba.conf").write_text(_MINIMAL_HBA)
        notes.append("the backup held no pg_hba.conf: local peer and 127.0.0.1 scram-sha-256 allowed")
    overrides = {
        "port": str(port),
        "listen_addresses": LOOPBACK,
        "unix_socket_directories": str(base / "socket"),
        # The log goes to pg_ctl's file, in English, so the runbook can tell where recovery stopped.
        "logging_collector": "off",
        "lc_messages": "C",
        **settings,
    }
    if not keep_archiving:
        overrides["archive_mode"] = "off"
        notes.append("archive_mode = off: the restored cluster does not archive")
    lines = ["", f"# added by runbooks pitr-restore at {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC"]
    lines += [_conf_line(k, v) for k, v in overrides.items()]
    with (data / "postgresql.auto.conf").open("a") as conf:
        conf.write("\n".join(lines) + "\n")
    (data / "standby.signal").unlink(missing_ok=True)
    (data / "recovery.signal").write_text("")
    if os.geteuid() == 0:
        for name in ("postgresql.auto.conf", "postgresql.conf", "pg_hba.conf", "recovery.signal"):
            shutil.chown(data / name, os_user, os_user)
    run_logger().info("recovery settings written to %s/postgresql.auto.conf: %s", data,
                      ", ".join(f"{k}={v}" for k, v in settings.items() if k != "restore_command"))
    return notes


@task(retries=0, cache_policy=NO_CACHE)
def check_restore_command(restore_command: list[str], data_dir: str, segment: str, *,
                          os_user: str = "postgres") -> float:
    """Run restore_command as PostgreSQL will (the OS user, in the data directory) for the first segment the
    restore needs: proves the command, its configuration and its permissions before the server starts.
    ``restore_command`` is the checked argv template (``restore_command_argv``); no shell runs it here."""
    import subprocess

    probe = "pg_wal/RUNBOOKS_PROBE"
    template = restore_command_argv(restore_command)
    parse_wal_name(segment)
    argv = [probe if word == "%p" else segment if word == "%f" else word for word in template]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", check_os_user(os_user), "--", *argv]
    started = time.monotonic()
    done = subprocess.run(argv, cwd=data_dir, capture_output=True, text=True, timeout=300, check=False)  # noqa: S603
    seconds = time.monotonic() - started
    fetched = Path(data_dir) / probe
    shown = " ".join(template)
    try:
        if done.returncode != 0 or not fetched.is_file():
            raise RestoreFailed(f"restore_command {shown!r} failed for {segment} as {os_user} "
                                f"({describe_exit(done.returncode)}): {done.stderr.strip()[-800:]}")
    finally:
        fetched.unlink(missing_ok=True)
    run_logger().info("restore_command fetched %s as %s in %.2f s", segment, os_user, seconds)
    return round(seconds, 3)


@task(retries=0, cache_policy=NO_CACHE)
def start_restored_cluster(
    target_dir: str, port: int, *, timeout_seconds: float = 3600, gap: str | None = None,
) -> int:
    """Start the restored cluster as its OS user (``pg_ctl -w``); it replays WAL from the archive.

    ``gap``: a segment the plan found missing, named if recovery fails."""
    server = ScratchPostgres.adopt(target_dir, port=port, start_timeout=timeout_seconds)
    try:
        server.start()
    except RuntimeError as exc:
        raise _failed(Path(target_dir), str(exc), gap) from None
    pid = server.postmaster_pid()
    run_logger().info("restored cluster in %s started on port %d (pid %s)", server.data_dir, port, pid)
    return int(pid or 0)


def _failed(base: Path, fallback: str, gap: str | None) -> RestoreFailed:
    message = _recovery_failure(base, fallback)
    if gap:
        return WalMissing(f"{message}. WAL segment {gap} is missing from the archive: recovery could not get "
                          "past it")
    return RestoreFailed(message)


def _recovery_failure(base: Path, fallback: str) -> str:
    log = parse_recovery_log(_read_log(base))
    if log.fatal:
        missing = [f for f in log.restore_failures if "not in the archive" in f]
        where = f"; last file asked for and not in the archive: {missing[-1].split()[0]}" if missing else ""
        return f"recovery in {base / 'data'} failed: {log.fatal[-1]}{where}. See {base / 'server.log'}"
    return fallback


def _read_log(base: Path) -> str:
    try:
        return (base / "server.log").read_text(errors="replace")
    except OSError:
        return ""


class RecoveryOutcome(BaseModel):
    """Where recovery stopped, as the server log tells it."""

    state: str = Field(description="promoted, paused or shut down")
    stopped_at: str | None
    stop_time: str | None
    stop_lsn: str | None
    redo_done_lsn: str | None
    last_transaction_time: str | None
    timeline: int | None
    last_restored: str | None
    seconds: float


@task(retries=0, cache_policy=NO_CACHE)
def wait_for_recovery(
    target_dir: str, *, action: str = "promote", timeout_seconds: float = 3600, gap: str | None = None,
) -> RecoveryOutcome:
    """Follow the server log until recovery ends: promoted, paused or shut down at the target, or failed."""
    base = Path(target_dir)
    server = ScratchPostgres.adopt(target_dir, port=0)
    started = time.monotonic()
    log = RecoveryLog()
    while time.monotonic() - started < timeout_seconds:
        log = parse_recovery_log(_read_log(base))
        done = {"promote": log.ready, "pause": log.paused, "shutdown": log.shut_down}.get(action, False)
        if done:
            break
        if log.fatal or not server.is_running():
            if action == "shutdown" and log.shut_down:
                break
            raise _failed(base, "the restored server stopped during recovery", gap)
        time.sleep(0.2)
    else:
        raise RestoreFailed(f"recovery in {base / 'data'} did not end within {timeout_seconds:.0f} s; it is still "
                            f"running (see {base / 'server.log'})")
    state = {"promote": "promoted", "pause": "paused", "shutdown": "shut down"}[action]
    outcome = RecoveryOutcome(state=state, stopped_at=log.stopped_at, stop_time=log.stop_time,
                              stop_lsn=log.stop_lsn, redo_done_lsn=log.redo_done_lsn,
                              last_transaction_time=log.last_transaction_time, timeline=log.new_timeline,
                              last_restored=log.restored[-1] if log.restored else None,
                              seconds=round(time.monotonic() - started, 3))
    run_logger().info("recovery of %s %s: %s", base / "data", state, outcome.stopped_at or
                      f"end of archive, redo done at {outcome.redo_done_lsn}")
    return outcome


def target_problems(outcome: RecoveryOutcome, target: RecoveryTarget, plan: RestorePlan) -> list[str]:
    """Why the recovery did not reach its target (empty: it did)."""
    if target.kind in ("time", "lsn", "name") and outcome.stopped_at is None:
        return [f"recovery ended (redo done at {outcome.redo_done_lsn}) without reaching {target.describe()}"
                + (f"; WAL segment {plan.gap} is missing from the archive" if plan.gap else "")]
    if target.kind == "name" and target.name and f'"{target.name}"' not in (outcome.stopped_at or ""):
        return [f"recovery stopped {outcome.stopped_at}, not at restore point {target.name!r}"]
    if target.kind == "latest" and plan.last_segment and (outcome.last_restored or "")[8:] < plan.last_segment[8:]:
        return [f"recovery replayed up to {outcome.last_restored}, but the archive holds WAL up to "
                f"{plan.last_segment}"]
    return []


# ------------------------------------------------------------------------------------------ retention


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
