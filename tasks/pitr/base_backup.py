"""Taking a physical base backup into the store, waiting for its WAL, and reading it back to verify it."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from blocks.errors import BaseBackupFailed, ConfigurationError, VerificationFailed
from blocks.postgres import PostgresConnection
from blocks.store import BackupStore
from tasks.log import run_logger
from tasks.manifest import BACKUP_MANIFEST, Part, base_backup_key, human_size
from tasks.pitr.replication import ReplicationBaseBackup
from tasks.pitr.tar import TarStream, check_backup_manifest
from tasks.process import describe_exit, pg_tool, spawn, tool_version
from tasks.retry import retry_transient
from tasks.stream import CHUNK, StreamResult, compress_into_store, open_compressed_writer, open_decompressed_reader
from tasks.wal import format_lsn, label_start, parse_backup_label, parse_lsn, segment_name, segment_of_lsn, wal_key


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


def _pg_basebackup_chunks(child: Any, target: str) -> Iterator[memoryview]:
    """pg_basebackup's stdout in 1 MiB chunks (one buffer, reused); raises at EOF unless the tool exited 0."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    while count := child.stdout.readinto(view):
        yield view[:count]
    code = child.wait()
    if code != 0:
        raise BaseBackupFailed(f"pg_basebackup of {target} failed ({describe_exit(code)}): {child.stderr_tail()}")


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
            chunks: Iterator[bytes | memoryview] = ReplicationBaseBackup(conn, pg.describe(), command).chunks()
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
