"""Redis snapshot, digest and restore against real redis-server instances on loopback.

Every server has a password; the snapshots go through the replication protocol (both the disk and the
diskless wire forms), BGSAVE, a local store, and back into a second server.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

import tasks.redis as redis_tasks
from blocks.errors import ChecksumMismatch, ConfigurationError, ConnectionFailed, DumpFailed, VerificationFailed
from blocks.redis import RedisConnection
from blocks.store import BackupStore
from tasks.manifest import RedisSummary, new_set_id
from tasks.redis import bgsave_and_wait, restore_redis, snapshot_redis
from tasks.redis_digest import _key_hash, keyspace_digest
from tasks.redis_replication import stream_rdb
from tasks.scratch import free_port
from tasks.scratch_redis import ScratchRedis
from tests.faults import FaultyProxy

SOURCE_PASSWORD = "s0urce-pw-Zq8"
BIG = os.urandom(5 * 1024 * 1024)
BULK_KEYS = 20_000


def _conn(server: ScratchRedis, password: str | None = None) -> RedisConnection:
    secret = password if password is not None else server.password
    return RedisConnection(host=server.host, port=server.port, password=SecretStr(secret) if secret else None)


def _client(server: ScratchRedis, db: int = 0) -> redis.Redis:
    return _conn(server).get_client(db=db)


def _seed(server: ScratchRedis) -> None:
    """Every value type, binary keys and values, a 5 MB value, TTLs, keys in db 0 and db 3."""
    r = _client(server)
    r.set(b"bin:\x00\xff\xfe key", bytes(range(256)))
    r.set("big", BIG)
    r.hset("hash", mapping={"f1": "v1", b"\x00field": b"\xff\x00value", "n": 42})
    r.rpush("list", "a", b"\x00", "a", "z")
    r.sadd("set", "m1", "m2", b"\xfe\xff")
    r.zadd("zset", {"a": 0.1, "b": -2.5, "c": 1e300, "d": float("inf"), b"\x00e": 3})
    r.xadd("stream", {"f": "v", "g": b"\x01\x02"}, id="1-1")
    r.execute_command("XADD", "stream", "2-0", "dup", "1", "dup", "2")  # a repeated field stays repeated
    r.xgroup_create("stream", "workers", id="0")
    r.set("ttl:string", "expires", ex=3600)
    r.hset("ttl:hash", "f", "v")
    r.expire("ttl:hash", 7200)
    with r.pipeline(transaction=False) as pipe:
        for i in range(BULK_KEYS):
            pipe.set(f"k:{i}".encode() + b"\xff", f"value {i}")
            if i % 100 == 0:
                pipe.pexpire(f"k:{i}".encode() + b"\xff", 3_600_000 + i)
        pipe.execute()
    r3 = _client(server, db=3)
    r3.set("in-db3", "three")
    r3.rpush("list3", "x", "y")
    r3.sadd("set3", "p")


def _expect_seeded(server: ScratchRedis) -> None:
    r = _client(server)
    assert r.get("big") == BIG
    assert r.get(b"bin:\x00\xff\xfe key") == bytes(range(256))
    assert r.zscore("zset", "c") == 1e300
    assert 0 < r.pttl("ttl:string") <= 3_600_000
    assert r.ttl(b"k:0\xff") > 3000
    assert r.ttl(b"k:1\xff") == -1
    assert r.xinfo_groups("stream")[0]["name"] in (b"workers", "workers")
    assert _client(server, db=3).get("in-db3") == b"three"


@pytest.fixture(scope="module")
def source() -> Iterator[ScratchRedis]:
    """A seeded server that the tests only read (snapshots do not change data)."""
    with ScratchRedis(password=SOURCE_PASSWORD) as server:
        # Diskless sync waits 5 s for more replicas by default; the tests do not need to.
        _client(server).config_set("repl-diskless-sync-delay", 0)
        _seed(server)
        yield server


@pytest.fixture(scope="module")
def source_summary(source: ScratchRedis) -> RedisSummary:
    return keyspace_digest(_conn(source))


# --------------------------------------------------------------------------------------------- digest


def test_digest_counts_every_database(source: ScratchRedis, source_summary: RedisSummary) -> None:
    assert source_summary.databases == {"0": BULK_KEYS + 9, "3": 3}
    assert source_summary.key_count == BULK_KEYS + 12
    assert len(source_summary.digest) == 64


def test_the_scripted_read_of_an_own_server_gives_the_same_digest(
    source: ScratchRedis, source_summary: RedisSummary
) -> None:
    stats = _client(source).info("commandstats")
    evals_before = stats.get("cmdstat_eval", {}).get("calls", 0)
    scripted = keyspace_digest(_conn(source), own_server=True)
    assert _client(source).info("commandstats")["cmdstat_eval"]["calls"] > evals_before  # it did use the script
    assert scripted == source_summary  # every type, binary keys, TTL flags, db 3


def test_digest_compares_scores_as_doubles_and_sees_ttl_flag() -> None:
    # 7.0 prints 0.1 as 0.10000000000000001, 7.2 as 0.1: same double, same digest.
    assert _key_hash(0, b"z", b"zset", False, [b"m", b"0.10000000000000001"]) == _key_hash(
        0, b"z", b"zset", False, [b"m", b"0.1"]
    )
    assert _key_hash(0, b"k", b"string", False, b"v") != _key_hash(0, b"k", b"string", True, b"v")
    assert _key_hash(0, b"k", b"string", False, b"v") != _key_hash(3, b"k", b"string", False, b"v")
    # Field order of a hash does not matter, list order does.
    assert _key_hash(0, b"h", b"hash", False, [b"a", b"1", b"b", b"2"]) == _key_hash(
        0, b"h", b"hash", False, [b"b", b"2", b"a", b"1"]
    )
    assert _key_hash(0, b"l", b"list", False, [b"a", b"b"]) != _key_hash(0, b"l", b"list", False, [b"b", b"a"])


# ------------------------------------------------------------------------------------ replication


@pytest.mark.parametrize("diskless", [True, False], ids=["diskless-eof-mark", "disk-bulk-length"])
def test_stream_rdb_snapshot_loads_with_the_same_digest(
    source: ScratchRedis, source_summary: RedisSummary, tmp_path: Path, diskless: bool
) -> None:
    rdb = tmp_path / "snap.rdb"
    with open(rdb, "wb") as out:
        written = stream_rdb(_conn(source), out, timeout=10, diskless=diskless)
    assert written == rdb.stat().st_size > len(BIG)
    assert rdb.read_bytes()[:5] == b"REDIS"
    with ScratchRedis(password="scratch-pw", rdb_file=rdb) as loaded:
        assert keyspace_digest(_conn(loaded)) == source_summary
        _expect_seeded(loaded)


def test_stream_rdb_is_consistent_while_another_client_writes(tmp_path: Path) -> None:
    """Each write sets counter=n, pair:n and appends n to a log in one MULTI: a snapshot shows all or none."""
    with ScratchRedis(password=SOURCE_PASSWORD) as server:
        r = _client(server)
        r.config_set("repl-diskless-sync-delay", 0)
        with r.pipeline(transaction=False) as pipe:
            for i in range(5000):
                pipe.set(f"base:{i}", "x" * 100)
            pipe.execute()
        stop = threading.Event()
        written = [0]

        def writer() -> None:
            w = _client(server)
            while not stop.is_set():
                n = written[0] + 1
                with w.pipeline(transaction=True) as tx:
                    tx.set("counter", n).set(f"pair:{n}", n).rpush("log", n)
                    tx.execute()
                written[0] = n

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            while written[0] < 300:
                time.sleep(0.01)
            rdb = tmp_path / "live.rdb"
            with open(rdb, "wb") as out:
                stream_rdb(_conn(server), out, timeout=10)
            at_snapshot = written[0]
            while written[0] < at_snapshot + 300:
                time.sleep(0.01)
        finally:
            stop.set()
            thread.join()
        with ScratchRedis(password="scratch-pw", rdb_file=rdb) as loaded:
            s = _client(loaded)
            c = int(s.get("counter"))
            assert 300 <= c < written[0]
            assert s.llen("log") == c and int(s.lindex("log", -1)) == c
            assert sum(1 for _ in s.scan_iter("pair:*", count=1000)) == c
            snapshot_digest = keyspace_digest(_conn(loaded))
        # Roll the live server back to counter=c: it must then equal the snapshot exactly.
        r.delete(*[f"pair:{n}" for n in range(c + 1, written[0] + 1)])
        r.ltrim("log", 0, c - 1)
        r.set("counter", c)
        assert keyspace_digest(_conn(server)) == snapshot_digest


# -------------------------------------------------------------------------------------------- BGSAVE


def test_bgsave_waits_out_a_running_save_and_starts_its_own() -> None:
    with ScratchRedis(password=SOURCE_PASSWORD) as server:
        r = _client(server)
        r.mset({f"slow:{i}": i for i in range(100)})
        r.config_set("rdb-key-save-delay", 5000)  # 5 ms per key: each save takes ~0.5 s
        before = r.info("persistence")
        r.bgsave()  # someone else's save, started before we ask
        started = time.monotonic()
        lastsave = bgsave_and_wait(_conn(server), timeout=20, poll=0.05)
        after = r.info("persistence")
        assert after["rdb_saves"] == before["rdb_saves"] + 2
        assert after["rdb_bgsave_in_progress"] == 0 and after["rdb_last_bgsave_status"] == "ok"
        assert lastsave == after["rdb_last_save_time"] >= before["rdb_last_save_time"]
        assert time.monotonic() - started >= 0.8  # both saves, not just the first


def test_bgsave_times_out_clearly() -> None:
    with ScratchRedis(password=SOURCE_PASSWORD) as server:
        r = _client(server)
        r.mset({f"slow:{i}": i for i in range(200)})
        r.config_set("rdb-key-save-delay", 50_000)  # 10 s save
        started = time.monotonic()
        with pytest.raises(DumpFailed, match=r"did not finish within 0.5 s") as caught:
            bgsave_and_wait(_conn(server), timeout=0.5, poll=0.05)
        assert time.monotonic() - started < 1.5
        assert f"127.0.0.1:{server.port}" in str(caught.value)


def test_snapshot_bgsave_mode_reads_the_rdb_file(
    source: ScratchRedis, source_summary: RedisSummary, tmp_path: Path
) -> None:
    rdb_path = str(source.rdb_path)  # the worker sees the server's dir, as with a shared volume
    store = BackupStore.from_url(f"file://{tmp_path / 'store'}")
    part = snapshot_redis.fn(_conn(source), store, new_set_id(), mode="bgsave", rdb_path=rdb_path, timeout=30)
    assert part.tool == "redis-bgsave" and part.server_version.startswith("7.")
    assert part.redis == source_summary


def test_snapshot_bgsave_mode_refuses_a_stale_file(source: ScratchRedis, tmp_path: Path) -> None:
    stale = tmp_path / "old.rdb"
    stale.write_bytes(b"REDIS0010")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    store = BackupStore.from_url(f"file://{tmp_path / 'store'}")
    with pytest.raises(ConfigurationError, match="before the BGSAVE"):
        snapshot_redis.fn(_conn(source), store, new_set_id(), mode="bgsave", rdb_path=str(stale), timeout=30)
    assert store.get_client().list() == []


# ------------------------------------------------------------------------------------------ restore


def test_snapshot_and_restore_round_trip(
    source: ScratchRedis, source_summary: RedisSummary, scratch_redis: ScratchRedis, tmp_path: Path
) -> None:
    target = scratch_redis  # an empty server of its own
    store = BackupStore.from_url(f"file://{tmp_path / 'store'}")
    set_id = new_set_id()
    started = time.monotonic()
    part = snapshot_redis.fn(_conn(source), store, set_id, name="cache", timeout=30)
    snapshot_seconds = time.monotonic() - started
    assert part.key == f"backups/{set_id}/redis/cache.rdb.zst"
    assert part.kind == "redis" and part.tool == "redis-replication"
    assert part.tool_version == part.server_version == _client(source).info("server")["redis_version"]
    assert part.redis == source_summary
    assert part.raw_size > len(BIG) and 0 < part.size <= part.raw_size + 1024
    assert [o.key for o in store.get_client().list()] == [part.key]

    started = time.monotonic()
    restored = restore_redis.fn(part, store, _conn(target))
    restore_seconds = time.monotonic() - started
    assert restored == source_summary
    _expect_seeded(target)
    print(f"\n20k-key snapshot {snapshot_seconds:.2f} s, restore {restore_seconds:.2f} s")

    # One changed value, or one TTL removed, changes the digest.
    t = _client(target)
    t.set(b"k:7\xff", "changed")
    assert keyspace_digest(_conn(target)).digest != source_summary.digest
    t.set(b"k:7\xff", "value 7")
    assert keyspace_digest(_conn(target)) == source_summary
    t.persist("ttl:string")
    assert keyspace_digest(_conn(target)).digest != source_summary.digest

    # A target holding something else fails verification unless flushed first.
    t.set("extra", "not in the snapshot")
    with pytest.raises(VerificationFailed, match="flush_first=True"):
        restore_redis.fn(part, store, _conn(target))
    assert restore_redis.fn(part, store, _conn(target), flush_first=True) == source_summary
    assert t.get("extra") is None


def test_restore_checks_the_checksum_before_touching_the_target(
    source: ScratchRedis, scratch_redis: ScratchRedis, tmp_path: Path
) -> None:
    target = scratch_redis  # an empty server of its own
    store = BackupStore.from_url(f"file://{tmp_path / 'store'}")
    part = snapshot_redis.fn(_conn(source), store, new_set_id(), timeout=30)
    _client(target).set("untouched", "yes")
    tampered = part.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(ChecksumMismatch):
        restore_redis.fn(tampered, store, _conn(target), flush_first=True)
    assert keyspace_digest(_conn(target)).databases == {"0": 1}


def test_cut_connection_mid_snapshot_stores_nothing_and_the_retry_succeeds(
    source: ScratchRedis,
    source_summary: RedisSummary,
    faulty_proxy: Callable[[str, int], FaultyProxy],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = faulty_proxy(source.host, source.port)
    conn = RedisConnection(host=proxy.host, port=proxy.port, password=SecretStr(SOURCE_PASSWORD))
    store = BackupStore.from_url(f"file://{tmp_path / 'store'}")
    set_id = new_set_id()
    tee_write = redis_tasks._StoreAndCopy.write

    def cut_after_a_megabyte(self: redis_tasks._StoreAndCopy, data: bytes | memoryview) -> int:
        if proxy.bytes_down > 1024 * 1024 and proxy.resets == 0:
            proxy.go_down()  # RST on the replication connection, mid-RDB
        return tee_write(self, data)

    monkeypatch.setattr(redis_tasks._StoreAndCopy, "write", cut_after_a_megabyte)
    with pytest.raises(ConnectionFailed, match="while receiving the snapshot"):
        snapshot_redis.fn(conn, store, set_id, timeout=10)
    assert store.get_client().list() == []  # no object, no partial upload left behind
    monkeypatch.undo()
    proxy.come_up()
    # What the task's retry does: the same key, from the start.
    part = snapshot_redis.fn(conn, store, set_id, timeout=10)
    assert part.redis == source_summary


def test_keys_expired_since_the_snapshot_are_not_restored_and_not_a_failure(
    scratch_redis: ScratchRedis, tmp_path: Path
) -> None:
    with ScratchRedis(password=SOURCE_PASSWORD) as server:
        r = _client(server)
        r.config_set("repl-diskless-sync-delay", 0)
        r.mset({f"stays:{i}": i for i in range(10)})
        r.set("goes", "soon", px=1500)
        store = BackupStore.from_url(f"file://{tmp_path / 'store'}")
        part = snapshot_redis.fn(_conn(server), store, new_set_id(), timeout=30)
    assert part.redis is not None and part.redis.key_count == 11
    time.sleep(1.6)
    restored = restore_redis.fn(part, store, _conn(scratch_redis))
    assert restored.key_count == 10 and _client(scratch_redis).get("goes") is None


def test_check_restore_refuses_a_snapshot_that_loads_differently() -> None:
    manifest = RedisSummary(key_count=3, digest="a" * 64, databases={"0": 3})
    loaded = RedisSummary(key_count=3, digest="b" * 64, databases={"0": 3})
    assert redis_tasks._check_restore("t", manifest, manifest, manifest, 0) == ""
    with pytest.raises(VerificationFailed, match="reads the file differently"):
        redis_tasks._check_restore("t", manifest, loaded, loaded, 0)
    fewer = RedisSummary(key_count=2, digest="c" * 64, databases={"0": 2})
    assert "1 keys of the snapshot had expired" in redis_tasks._check_restore("t", manifest, fewer, fewer, 1)
    with pytest.raises(VerificationFailed, match="flush_first=True"):
        redis_tasks._check_restore("t", manifest, manifest, loaded, 0)


# ------------------------------------------------------------------------------------------- errors


def test_wrong_password_is_a_clear_error_without_the_password(source: ScratchRedis, tmp_path: Path) -> None:
    wrong = "wr0ng-Secret-771"
    conn = _conn(source, password=wrong)
    # Our own socket, and redis-py behind every other step (which retries the refusal for ~4 s first).
    checks: list[Callable[[], object]] = [
        lambda: stream_rdb(conn, io.BytesIO(), timeout=5),
        lambda: snapshot_redis.fn(conn, BackupStore.from_url(f"file://{tmp_path}"), new_set_id(), timeout=5),
    ]
    for check in checks:
        with pytest.raises(ConnectionFailed) as caught:
            check()
        message = str(caught.value)
        assert wrong not in message and SOURCE_PASSWORD not in message
        assert f"127.0.0.1:{source.port}" in message
    # No password at all: the server's NOAUTH, not a protocol error.
    with pytest.raises(ConnectionFailed, match="NOAUTH"):
        stream_rdb(_conn(source, password=""), io.BytesIO(), timeout=5)


def test_silent_server_times_out_within_the_timeout() -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does) and never answers
    port = listener.getsockname()[1]
    conn = RedisConnection(host="127.0.0.1", port=port, password=SecretStr("pw-never-shown"))
    try:
        started = time.monotonic()
        with pytest.raises(DumpFailed) as caught:
            stream_rdb(conn, io.BytesIO(), timeout=1.0)
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert 0.9 <= elapsed < 1.8
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "sent nothing for 1 s" in message
    assert "pw-never-shown" not in message


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """redis-server on a TLS-only port with a self-signed certificate for 127.0.0.1 (its own CA)."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is missing: `make system-deps` installs it"
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    port = free_port()
    config = tmp_path / "redis.conf"
    config.write_text(
        f"port 0\ntls-port {port}\nbind 127.0.0.1\ndir {tmp_path}\nsave \"\"\nlogfile {tmp_path / 'redis.log'}\n"
        f"tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {cert}\ntls-auth-clients no\n"
        f"requirepass {SOURCE_PASSWORD}\nrepl-diskless-sync-delay 0\n"
    )
    server = subprocess.Popen(["redis-server", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        probe = RedisConnection(port=port, password=SecretStr(SOURCE_PASSWORD), tls=True, tls_ca_file=str(cert))
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.get_client(retry=None).ping()
                break
            except redis.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    logged = tmp_path / "redis.log"
                    tail = logged.read_text(errors="replace")[-1000:] if logged.exists() else "(no log)"
                    pytest.fail(f"redis-server did not start with TLS (Debian's is built with it): {tail}")
                time.sleep(0.05)
        yield port, cert
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_stream_rdb_over_tls(tls_server: tuple[int, Path], tmp_path: Path) -> None:
    port, cert = tls_server
    conn = RedisConnection(port=port, password=SecretStr(SOURCE_PASSWORD), tls=True, tls_ca_file=str(cert))
    r = conn.get_client()
    r.set(b"bin\x00", os.urandom(1000))
    r.zadd("z", {"a": 1.5})
    rdb = tmp_path / "tls.rdb"
    with open(rdb, "wb") as out:
        stream_rdb(conn, out, timeout=10)
    with ScratchRedis(password="scratch-pw", rdb_file=rdb) as loaded:
        assert keyspace_digest(_conn(loaded)) == keyspace_digest(conn)
    # Without the CA the server's certificate is not trusted: refused, not silently accepted.
    untrusted = RedisConnection(port=port, password=SecretStr(SOURCE_PASSWORD), tls=True)
    with pytest.raises(ConnectionFailed, match="TLS handshake"):
        stream_rdb(untrusted, io.BytesIO(), timeout=5)


# ---------------------------------------------- wire forms a real 7.0 server does not produce on demand


class _FakeMaster:
    """Answers AUTH/REPLCONF like an old master, then sends ``payload`` for SYNC in small pieces."""

    def __init__(self, payload: bytes, *, rdb_only: bool = False, piece: int = 7) -> None:
        self.payload = payload
        self.rdb_only = rdb_only
        self.piece = piece
        self.commands: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        sock, _ = self.listener.accept()
        with sock:
            reader = sock.makefile("rb")
            while True:
                count = int(reader.readline()[1:])
                args = []
                for _ in range(count):
                    size = int(reader.readline()[1:])
                    args.append(reader.read(size + 2)[:-2])
                self.commands.append(b" ".join(args[:2]))
                if args[0] == b"SYNC":
                    break
                if args[:2] == [b"REPLCONF", b"rdb-only"] and not self.rdb_only:
                    sock.sendall(b"-ERR Unrecognized REPLCONF option: rdb-only\r\n")
                else:
                    sock.sendall(b"+OK\r\n")
            sock.sendall(b"\n\n")  # keep-alives while "forking"
            for start in range(0, len(self.payload), self.piece):
                sock.sendall(self.payload[start : start + self.piece])
            time.sleep(0.2)

    def conn(self) -> RedisConnection:
        return RedisConnection(host="127.0.0.1", port=self.port, password=SecretStr("pw"))


def test_eof_mark_split_across_reads_and_old_server_fallback() -> None:
    mark = b"0123456789abcdef0123456789abcdef01234567"
    body = b"REDIS0009" + os.urandom(3000) + mark[:20]  # a partial mark inside the payload
    fake = _FakeMaster(b"$EOF:" + mark + b"\r\n" + body + mark)
    sink = io.BytesIO()
    assert stream_rdb(fake.conn(), sink, timeout=5) == len(body)
    assert sink.getvalue() == body
    # CONFIG GET (to lower the diskless delay) is refused by this old master; the snapshot goes on.
    assert fake.commands == [b"AUTH pw", b"CONFIG GET", b"REPLCONF rdb-only", b"REPLCONF capa", b"SYNC"]


def test_not_an_rdb_is_refused() -> None:
    fake = _FakeMaster(b"$11\r\nHELLO WORLD", rdb_only=True)
    with pytest.raises(DumpFailed, match="did not send an RDB file"):
        stream_rdb(fake.conn(), io.BytesIO(), timeout=5)


def test_the_diskless_delay_is_lowered_for_the_snapshot_and_put_back() -> None:
    """A stock Redis 7 waits repl-diskless-sync-delay (5 s) before streaming to a new replica: the snapshot sets
    it to 0 until its transfer starts, then back; a user who may not run CONFIG gets the snapshot anyway.
    What the server ran is read from INFO commandstats (MONITOR does not show CONFIG)."""
    with ScratchRedis(password=SOURCE_PASSWORD) as server:
        admin = _client(server)
        admin.config_set("repl-diskless-sync-delay", 5)
        admin.set("k", "v")

        def config_set_calls() -> tuple[int, int]:
            stats = admin.info("commandstats").get("cmdstat_config|set", {})
            return int(stats.get("calls", 0)), int(stats.get("rejected_calls", 0))

        before = config_set_calls()
        assert stream_rdb(_conn(server), io.BytesIO(), timeout=30) > 0
        after = config_set_calls()
        assert (after[0] - before[0], after[1] - before[1]) == (2, 0)  # set to 0, then back
        assert admin.config_get("repl-diskless-sync-delay") == {"repl-diskless-sync-delay": "5"}

        admin.execute_command("ACL", "SETUSER", "snap", "on", ">snap-pw", "~*", "&*", "+@all", "-config")
        limited = RedisConnection(host=server.host, port=server.port, username="snap", password=SecretStr("snap-pw"))
        before = config_set_calls()
        assert stream_rdb(limited, io.BytesIO(), timeout=30) > 0
        assert config_set_calls() == before
        assert admin.config_get("repl-diskless-sync-delay") == {"repl-diskless-sync-delay": "5"}
