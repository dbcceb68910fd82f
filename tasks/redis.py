"""Redis steps: take an RDB snapshot over the network, restore one key by key, and the pre-flight of a
recovery; each proven by the keyspace digest (tasks/redis_digest.py).

Nothing here needs the Redis host's filesystem except ``mode="bgsave"``, which reads the file the
operator's ``rdb_path`` points at. The snapshot goes over the replication protocol, like
``redis-cli --rdb``; the restore loads the RDB into a scratch redis-server next to the worker and copies
every key with DUMP/RESTORE.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import redis
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from blocks.errors import (
    ConfigurationError,
    DumpFailed,
    PreflightFailed,
    RestoreFailed,
    VerificationFailed,
)
from blocks.redis import RedisConnection
from blocks.store import BackupStore
from tasks.log import run_logger
from tasks.manifest import Part, RedisSummary, part_key
from tasks.redis_client import databases_with_keys, raw_client, talking_to
from tasks.redis_digest import keyspace_digest
from tasks.redis_replication import ByteSink, RdbMagicCheck, stream_rdb
from tasks.retry import retry_transient
from tasks.scratch_redis import ScratchRedis
from tasks.stream import CHUNK, StreamResult, open_compressed_writer, open_decompressed_reader

# -------------------------------------------------------------------------------------------- BGSAVE


def bgsave_and_wait(conn: RedisConnection, *, timeout: float, poll: float = 0.2) -> int:
    """Have the server write its RDB file (BGSAVE) and wait until that save is done; returns LASTSAVE.

    A save already running started before we asked, so it is waited out and a new one started. Done is
    ``rdb_saves`` grown (Redis >= 7.0; older servers: LASTSAVE changed) with no save in progress.
    """
    where = conn.describe()
    deadline = time.monotonic() + timeout
    client = conn.get_client()
    requested = False
    with talking_to(conn, "running BGSAVE"):
        info = client.info("persistence")
        before = info
        while True:
            if not requested and not info["rdb_bgsave_in_progress"]:
                before = info
                try:
                    # SCHEDULE: if an AOF rewrite runs, start the save when it ends instead of failing.
                    client.execute_command("BGSAVE", "SCHEDULE")
                    requested = True
                except redis.ResponseError as exc:
                    if "already in progress" not in str(exc):
                        raise DumpFailed(f"Redis {where} refused BGSAVE: {exc}") from None
            if requested and not info["rdb_bgsave_in_progress"]:
                if "rdb_saves" in info:
                    finished = info["rdb_saves"] > before["rdb_saves"]
                else:
                    finished = info["rdb_last_save_time"] != before["rdb_last_save_time"] or (
                        info["rdb_last_bgsave_status"] != "ok" and before["rdb_last_bgsave_status"] == "ok"
                    )
                if finished:
                    if info["rdb_last_bgsave_status"] != "ok":
                        raise DumpFailed(
                            f"BGSAVE on Redis {where} failed (rdb_last_bgsave_status="
                            f"{info['rdb_last_bgsave_status']}): see the server's log for the disk error"
                        )
                    return int(info["rdb_last_save_time"])
            if time.monotonic() + poll > deadline:
                raise DumpFailed(
                    f"BGSAVE on Redis {where} did not finish within {timeout:g} s "
                    f"(save in progress: {bool(info['rdb_bgsave_in_progress'])}); nothing was stored"
                )
            time.sleep(poll)
            info = client.info("persistence")






@contextmanager
def _scratch_with(rdb: Path) -> Iterator[RedisConnection]:
    """A scratch redis-server on loopback holding ``rdb``; it has a password of its own, as the data
    is a copy of production. Loading takes time: allow a minute plus 20 MiB/s."""
    with ScratchRedis(
        password=secrets.token_urlsafe(24),
        rdb_file=rdb,
        start_timeout=60 + rdb.stat().st_size / (20 * 1024 * 1024),
    ) as scratch:
        yield RedisConnection(
            host=scratch.host, port=scratch.port, password=SecretStr(scratch.password or "")
        )


def _digest_rdb_file(path: Path) -> RedisSummary:
    """Load an RDB file into a scratch server (which proves it loads) and digest what it holds."""
    with _scratch_with(path) as scratch:
        return keyspace_digest(scratch, own_server=True)


# ----------------------------------------------------------------------------------------- snapshot


class _StoreAndCopy:
    """Writes every chunk to each sink: the store writer and a local copy of the RDB."""

    def __init__(self, *sinks: ByteSink) -> None:
        self.sinks = sinks

    def write(self, data: bytes | memoryview) -> int:
        for sink in self.sinks:
            sink.write(data)
        return len(data)


def _server_version(conn: RedisConnection) -> str:
    with talking_to(conn, "reading INFO server"):
        return str(conn.get_client().info("server")["redis_version"])


def _copy_rdb_file(path: Path, sink: ByteSink, not_before: int) -> int:
    """Copy the RDB file BGSAVE wrote; refuses a file older than that save (a wrong ``rdb_path``)."""
    try:
        source = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ConfigurationError(f"cannot read rdb_path {path}: {exc.strerror}") from None
    with source:
        modified = os.fstat(source.fileno()).st_mtime
        # 5 s of slack for clocks that differ between the Redis host and a shared volume.
        if modified < not_before - 5:
            raise ConfigurationError(
                f"rdb_path {path} was last written at {time.ctime(modified)}, before the BGSAVE that "
                f"finished at {time.ctime(not_before)}: point rdb_path at the server's dir/dbfilename"
            )
        checked = RdbMagicCheck(sink, f"rdb_path {path}")
        while chunk := source.read(CHUNK):
            checked.write(chunk)
        return checked.finish()


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def snapshot_redis(
    conn: RedisConnection,
    store: BackupStore,
    set_id: str,
    *,
    name: str = "redis",
    mode: Literal["replication", "bgsave"] = "replication",
    rdb_path: str | None = None,
    timeout: float = 600,
    level: int = 1,
    key: str | None = None,
) -> Part:
    """Stream an RDB snapshot into the store, and record the digest of what it holds.

    ``key``: where to store it; by default the set's Redis part key (a recovery's safety copy goes elsewhere).

    The RDB is also copied to a local temporary file and loaded into a scratch redis-server before the
    store object is committed, so a stored snapshot is one that loads, and a failed attempt leaves
    nothing behind for the retry to trip over. The worker needs disk and memory for one copy, and
    ``seconds`` includes that check. ``timeout``: longest silence from the server (replication) or
    longest wait for BGSAVE.
    """
    if mode not in ("replication", "bgsave"):
        raise ConfigurationError(f"unknown Redis snapshot mode {mode!r}; use 'replication' or 'bgsave'")
    if mode == "bgsave" and not rdb_path:
        raise ConfigurationError("mode='bgsave' needs rdb_path: the RDB file the server writes")
    version = _server_version(conn)
    key = key or part_key(set_id, "redis", name)
    client = store.get_client()
    run_logger().info(
        "Redis %s (%s): %s snapshot into %s/%s", conn.describe(), version, mode, store.describe(), key
    )
    results: list[StreamResult] = []
    with tempfile.TemporaryDirectory(prefix="runbooks-redis-") as tmp:
        copy_path = Path(tmp) / "snapshot.rdb"
        with (
            open(copy_path, "wb") as copy,
            open_compressed_writer(client, key, level=level, result=results) as writer,
        ):
            sink = _StoreAndCopy(writer, copy)
            if mode == "replication":
                stream_rdb(conn, sink, timeout=timeout)
            else:
                saved_at = bgsave_and_wait(conn, timeout=timeout)
                _copy_rdb_file(Path(rdb_path or ""), sink, saved_at)
            copy.close()
            summary = _digest_rdb_file(copy_path)
    result = results[0]
    return Part(
        kind="redis",
        name=name,
        key=key,
        size=result.size,
        raw_size=result.raw_size,
        sha256=result.sha256,
        compression_level=level,
        tool="redis-replication" if mode == "replication" else "redis-bgsave",
        tool_version=version,
        server_version=version,
        seconds=round(result.seconds, 3),
        redis=summary,
    )


# ------------------------------------------------------------------------------------------ restore


def _copy_database(source: redis.Redis, target: redis.Redis, *, batch: int) -> int:
    """DUMP+PTTL from the scratch server, RESTORE ... REPLACE on the target, a batch per round trip."""
    copied = 0
    cursor: bytes | int = 0
    while True:
        cursor, keys = source.execute_command("SCAN", cursor, "COUNT", batch)
        if keys:
            pipe = source.pipeline(transaction=False)
            for key in keys:
                pipe.execute_command("DUMP", key)
                pipe.execute_command("PTTL", key)
            replies = pipe.execute()
            out = target.pipeline(transaction=False)
            for key, payload, ttl in zip(keys, replies[::2], replies[1::2], strict=True):
                if payload is None or ttl == -2:
                    continue
                # PTTL -1: no expiry (RESTORE ttl 0); 0 would also mean "none", so 1 ms instead.
                out.execute_command("RESTORE", key, 1 if ttl == 0 else max(ttl, 0), payload, "REPLACE")
            copied += len(out.execute())
        if int(cursor) == 0:
            return copied


def _check_restore(
    where: str, manifest: RedisSummary, loaded: RedisSummary, restored: RedisSummary, expired_on_load: int
) -> str:
    """Raise VerificationFailed unless the target holds what the snapshot holds; returns a note to log.

    ``loaded`` is the digest of the snapshot as the scratch server loaded it. Keys whose TTL ran out
    since the snapshot are dropped at load (Redis does not load expired keys), so a restore of an old
    snapshot with volatile keys cannot match the manifest exactly; that case passes, with a note, when
    the missing keys are no more than those the loader reported expired.
    """
    if (restored.digest, restored.databases) != (loaded.digest, loaded.databases):
        raise VerificationFailed(
            f"Redis {where} holds {restored.databases} keys per db (digest {restored.digest[:16]}...) after "
            f"the restore, the snapshot {loaded.databases} ({loaded.digest[:16]}...): the target held other "
            "keys (restore with flush_first=True or into an empty server) or something wrote to it meanwhile. "
            "The restored keys stay in place"
        )
    if (loaded.digest, loaded.databases) == (manifest.digest, manifest.databases):
        return ""
    missing = manifest.key_count - loaded.key_count
    only_fewer = all(count <= manifest.databases.get(db, 0) for db, count in loaded.databases.items())
    if 0 < missing <= expired_on_load and only_fewer:
        return (
            f"{missing} keys of the snapshot had expired (TTL) before it was loaded and were not restored; "
            "the rest equals the snapshot file, whose sha256 matched the manifest"
        )
    raise VerificationFailed(
        f"the snapshot loaded for {where} holds {loaded.databases} keys per db (digest {loaded.digest[:16]}...), "
        f"its manifest recorded {manifest.databases} ({manifest.digest[:16]}...), and only {expired_on_load} "
        "keys expired at load: this redis-server reads the file differently. The target holds what it read"
    )


@task(cache_policy=NO_CACHE)
def restore_redis(
    part: Part,
    store: BackupStore,
    target: RedisConnection,
    *,
    flush_first: bool = False,
    batch: int = 500,
    staged_rdb: str | None = None,
) -> RedisSummary:
    """Copy every key of a snapshot into ``target`` (same database numbers) and verify the digest.

    ``staged_rdb``: the snapshot already downloaded and checked (``stage_part``); else it is fetched here.

    The snapshot is downloaded and its checksum verified before the target is touched, then loaded into
    a scratch server and copied with DUMP/RESTORE ... REPLACE, keeping TTLs. ``flush_first`` empties
    every target database that holds keys first. The digest check compares the whole target with the
    snapshot, so it only passes when the target held nothing else: use ``flush_first`` or an empty
    target. Keys whose TTL ran out since the snapshot are not restored (see ``_check_restore``).
    The local redis-server must read the snapshot's RDB version, and the target the local one's.
    """
    if part.kind != "redis" or part.redis is None:
        raise ConfigurationError(f"part {part.key} is a {part.kind} part without a Redis summary")
    where = target.describe()
    run_logger().info(
        "Restoring Redis snapshot %s (%d keys) into %s%s",
        part.key, part.redis.key_count, where, " after flushing it" if flush_first else "",
    )
    with talking_to(target, "checking the target"):
        target.get_client().ping()
    with tempfile.TemporaryDirectory(prefix="runbooks-redis-") as tmp:
        rdb = Path(staged_rdb) if staged_rdb else Path(tmp) / "snapshot.rdb"
        if not staged_rdb:
            with (
                open(rdb, "wb") as out,
                open_decompressed_reader(store.get_client(), part.key, sha256=part.sha256, size=part.size) as src,
            ):
                shutil.copyfileobj(src, out, CHUNK)
        # The checksum has been verified: from here on the target changes.
        copied = 0
        with _scratch_with(rdb) as source, talking_to(target, "restoring keys"):
            expired_on_load = int(source.get_client().info("persistence").get("rdb_last_load_keys_expired", 0))
            if flush_first:
                for db in sorted(databases_with_keys(target)):
                    target.get_client(db=db).flushdb()
            for db in sorted(databases_with_keys(source)):
                try:
                    copied += _copy_database(raw_client(source, db), raw_client(target, db), batch=batch)
                except redis.ResponseError as exc:
                    raise RestoreFailed(
                        f"Redis {where} db {db} refused RESTORE ({exc}) after {copied} keys; the target "
                        "holds a partial restore: fix the cause and run again (keys are replaced)"
                    ) from None
            loaded = keyspace_digest(source, own_server=True)
    restored = keyspace_digest(target)
    note = _check_restore(where, part.redis, loaded, restored, expired_on_load)
    if note:
        run_logger().warning("Redis %s: %s", where, note)
    return restored


# ------------------------------------------------------------------------------ recovery pre-flight


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def check_redis_empty(target: RedisConnection) -> None:
    """Refuse a target that holds keys: restoring into it would mix the snapshot with what is there."""
    with talking_to(target, "counting its keys"):
        held = databases_with_keys(target)
    if held:
        raise ConfigurationError(
            f"Redis {target.describe()} holds {sum(held.values())} keys (per db: {held}): restore-set only "
            "restores into an empty Redis; give another target, or replace_existing=True to replace them after "
            "a safety copy; nothing was changed")


@dataclass(frozen=True)
class RedisPreflight:
    key_count: int
    note: str


_PREFLIGHT_PREFIX = "runbooks:preflight:"


@task(cache_policy=NO_CACHE)
def preflight_redis_restore(part: Part, target: RedisConnection, *, staged_rdb: str) -> RedisPreflight:
    """Prove, leaving the target as it was, that the snapshot loads and matches its manifest, and that the
    target takes a RESTORE of one of its real keys (under a temporary name, deleted at once).

    Catches before any change what would stop a restore half way: an older server that cannot read the
    snapshot's DUMP payloads, an ACL without RESTORE or DEL, a read-only replica. A target whose maxmemory
    looks too small for the snapshot gets a warning, not a refusal (memory use differs between servers).
    """
    if part.kind != "redis" or part.redis is None:
        raise ConfigurationError(f"part {part.key} is a {part.kind} part without a Redis summary")
    where = target.describe()
    with _scratch_with(Path(staged_rdb)) as source:
        expired = int(source.get_client().info("persistence").get("rdb_last_load_keys_expired", 0))
        loaded = keyspace_digest(source, own_server=True)
        _check_restore(where, part.redis, loaded, loaded, expired)
        sample: tuple[int, bytes, bytes] | None = None
        for db in sorted(databases_with_keys(source)):
            client = raw_client(source, db)
            key = client.execute_command("RANDOMKEY")
            if key is not None:
                sample = (db, key, client.execute_command("DUMP", key))
                break
        used = int(source.get_client().info("memory")["used_memory"])
    note = ""
    with talking_to(target, "the pre-flight"):
        info = target.get_client().info()
        if info.get("role") != "master":
            raise PreflightFailed(f"Redis {where} is a {info.get('role')}, not a master: it cannot be restored "
                                  "into; nothing was changed")
        maxmemory = int(info.get("maxmemory", 0))
        if maxmemory and used > maxmemory:
            note = (f"the snapshot used {used} bytes in a scratch server, and {where} has maxmemory {maxmemory}: "
                    "the restore may run out of memory (it would then be undone)")
            run_logger().warning("Redis pre-flight: %s", note)
        if sample is not None:
            db, key, payload = sample
            probe = _PREFLIGHT_PREFIX + secrets.token_hex(8)
            client = raw_client(target, db)
            try:
                client.execute_command("RESTORE", probe, 0, payload)
            except redis.ResponseError as exc:
                raise PreflightFailed(
                    f"Redis {where} db {db} refused to RESTORE a key of the snapshot ({exc}): check the ACL "
                    "(+restore +del +flushdb), the server version and maxmemory; nothing was changed") from None
            finally:
                try:
                    client.execute_command("DEL", probe)
                except redis.ResponseError as exc:
                    run_logger().warning("could not delete the pre-flight key %s on %s: %s", probe, where, exc)
    run_logger().info("Redis pre-flight of %s passed: snapshot of %d keys loads and matches its manifest; the "
                      "target took a RESTORE of one of them", where, loaded.key_count)
    return RedisPreflight(key_count=loaded.key_count, note=note)
