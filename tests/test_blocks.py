"""Blocks: built from URLs, described without secrets, refusing bad input."""

import hashlib
import os
import time

import pytest
from pydantic import SecretStr

from blocks.backends import StoreURL, parse_store_url
from blocks.errors import ConfigurationError, ConnectionFailed
from blocks.postgres import PostgresConnection
from blocks.redis import RedisConnection
from blocks.store import BackupStore

MIB = 1024 * 1024


def test_postgres_from_url_keeps_password_out_of_description_and_repr():
    pg = PostgresConnection.from_url("postgresql://app%40x:s3cr%2Ft@db.example:6543/My%20DB?sslmode=require")
    assert (pg.host, pg.port, pg.user, pg.database, pg.sslmode) == ("db.example", 6543, "app@x", "My DB", "require")
    assert pg.password.get_secret_value() == "s3cr/t"
    assert "s3cr" not in pg.describe() and "s3cr" not in repr(pg) and "s3cr" not in str(pg.model_dump())
    env = pg.libpq_env("other")
    assert env["PGPASSWORD"] == "s3cr/t" and env["PGDATABASE"] == "other"


def test_postgres_url_errors():
    with pytest.raises(ConfigurationError, match="not a PostgreSQL URL"):
        PostgresConnection.from_url("mysql://x")


def test_connection_failure_names_host_and_database_not_password():
    pg = PostgresConnection.from_url("postgresql://u:topsecretpw@127.0.0.1:1/appdb")
    with pytest.raises(ConnectionFailed) as err:
        pg.connect()
    assert "127.0.0.1:1/appdb" in str(err.value) and "topsecretpw" not in str(err.value)


def test_redis_from_url():
    r = RedisConnection.from_url("rediss://ops:pw@cache:6380/3")
    assert (r.host, r.port, r.db, r.username, r.tls) == ("cache", 6380, 3, "ops", True)
    assert "pw" not in r.describe()
    with pytest.raises(ConfigurationError):
        RedisConnection.from_url("redis://h/x")


def test_store_from_url():
    local = BackupStore.from_url("file:///var/backups/app")
    assert (local.backend, local.path) == ("local", "/var/backups/app")
    s3 = BackupStore.from_url("s3://bucket/some/prefix?endpoint_url=http://127.0.0.1:8333&region=us-east-1&sse=AES256")
    assert (s3.backend, s3.bucket, s3.prefix, s3.endpoint_url, s3.region, s3.sse) == (
        "s3", "bucket", "some/prefix", "http://127.0.0.1:8333", "us-east-1", "AES256")
    assert s3.describe() == "s3://bucket/some/prefix at http://127.0.0.1:8333"
    with pytest.raises(ConfigurationError, match="not in the URL"):
        BackupStore.from_url("s3://key:secret@bucket/p")
    with pytest.raises(ConfigurationError, match="unknown S3 store option"):
        BackupStore.from_url("s3://bucket/p?endpoint=x")
    with pytest.raises(ConfigurationError, match="kms_key_id"):
        BackupStore.from_url("s3://bucket/p?sse=aws:kms").get_client()


def test_parse_store_url_is_shared_by_the_block_and_the_wal_commands():
    assert parse_store_url("/plain/dir") == StoreURL("local", path="/plain/dir")
    assert parse_store_url("file:///a%20b") == StoreURL("local", path="/a b")
    assert parse_store_url("s3://b/x/y/?region=r&region=r2") == StoreURL(
        "s3", bucket="b", prefix="x/y", options={"region": "r2"})
    with pytest.raises(ConfigurationError, match="has no path"):
        parse_store_url("file://")
    with pytest.raises(ConfigurationError, match="scheme 'http'"):
        parse_store_url("http://u:pw@host/x")
    with pytest.raises(ConfigurationError, match="names no bucket"):
        parse_store_url("s3:///prefix")
    with pytest.raises(ConfigurationError, match="in AWS_\\* variables, not in the URL") as err:
        parse_store_url("s3://key:secret@bucket/p", credentials_hint="AWS_* variables")
    assert "secret" not in str(err.value)


@pytest.mark.parametrize("sizes", [
    [3 * MIB, 7 * MIB + 1, 1, 6 * MIB + 2],   # parts filled across chunk boundaries, a short last part
    [5 * MIB, 5 * MIB],                        # exact multiples: no empty part at the end
    [1, 2 * MIB],                              # under one part: a single put_object
])
def test_s3_writer_stores_exactly_the_bytes_written(s3, sizes):
    store = BackupStore(backend="s3", bucket=s3.bucket, prefix=f"writer-{time.time_ns()}",
                        endpoint_url=s3.endpoint_url, region=s3.region, access_key_id=SecretStr(s3.access_key),
                        secret_access_key=SecretStr(s3.secret_key), part_size_mib=5, max_concurrency=2)
    client = store.get_client()
    chunks = [os.urandom(n) for n in sizes]
    with client.open_write("obj") as out:
        for chunk in chunks:
            out.write(memoryview(chunk))
    whole = b"".join(chunks)
    with client.open_read("obj") as stored:
        assert hashlib.sha256(stored.read()).hexdigest() == hashlib.sha256(whole).hexdigest()
    etag = client.client.head_object(Bucket=s3.bucket, Key=f"{store.prefix}/obj")["ETag"].strip('"')
    parts = int(etag.split("-")[1]) if "-" in etag else 0  # a multipart object's ETag ends in -<parts>
    assert parts == (-(-len(whole) // (5 * MIB)) if len(whole) > 5 * MIB else 0)


def test_s3_writer_holds_a_small_object_without_allocating_a_whole_part(s3):
    """A WAL segment (a few MiB compressed) into a store with 64 MiB parts: zero-filling a whole part
    cost 36 ms per segment, more than compressing and uploading it. The first part starts small and grows."""
    import tracemalloc

    store = BackupStore(backend="s3", bucket=s3.bucket, prefix=f"small-{time.time_ns()}",
                        endpoint_url=s3.endpoint_url, region=s3.region, access_key_id=SecretStr(s3.access_key),
                        secret_access_key=SecretStr(s3.secret_key), part_size_mib=64)
    client = store.get_client()
    chunk = os.urandom(MIB)
    with client.open_write("segment") as out:
        tracemalloc.start()
        try:
            for _ in range(3):
                out.write(memoryview(chunk))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert out.filled == 3 * MIB and len(out.buffer) == 4 * MIB  # the first buffer, not a 64 MiB part
    assert peak < 8 * MIB, f"{peak / MIB:.1f} MiB traced while writing 3 MiB"
    with client.open_read("segment") as stored:
        assert stored.read() == chunk * 3
