"""The scratch servers and the fault proxy against the real binaries: PostgreSQL, redis-server, weed."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from redis.backoff import NoBackoff
from redis.retry import Retry

from deployments.sandbox import SeaweedS3
from tasks.scratch import ScratchPostgres, free_port
from tasks.scratch_redis import ScratchRedis
from tests.faults import FaultyProxy


def _pg_connect(server: ScratchPostgres, port: int | None = None) -> psycopg.Connection:
    return psycopg.connect(
        host=server.host, port=port or server.port, user="postgres", password=server.password,
        dbname="postgres", connect_timeout=5, autocommit=True,
    )


def _wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# -------------------------------------------------------------------------------------------- postgres


def test_postgres_round_trip_with_password_over_tcp(pg: ScratchPostgres) -> None:
    with _pg_connect(pg) as conn:
        conn.execute("CREATE TABLE scratch_probe (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO scratch_probe SELECT g, 'row ' || g FROM generate_series(1, 100) g")
        rows = conn.execute("SELECT count(*), max(name) FROM scratch_probe").fetchone()
        settings = conn.execute(
            "SELECT current_setting('data_checksums'), current_setting('listen_addresses'), "
            "current_setting('fsync')"
        ).fetchone()
        conn.execute("DROP TABLE scratch_probe")
    assert rows == (100, "row 99")
    assert settings == ("on", "127.0.0.1", "on")
    assert pg.url == f"postgresql://postgres:{pg.password}@127.0.0.1:{pg.port}/postgres"
    assert pg.password not in repr(pg)
    assert pg.data_dir.is_dir()


def test_postgres_rejects_a_wrong_password(pg: ScratchPostgres) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host=pg.host, port=pg.port, user="postgres", password="not-the-password",
                        dbname="postgres", connect_timeout=5)


def test_fresh_pg_kill_drops_sessions_then_start_recovers(fresh_pg: ScratchPostgres) -> None:
    with _pg_connect(fresh_pg) as conn:
        assert conn.execute("SELECT current_setting('fsync')").fetchone() == ("off",)
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
        conn.execute("CREATE TABLE survivor AS SELECT g FROM generate_series(1, 1000) g")
        fresh_pg.kill()
        assert not fresh_pg.is_running()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        _pg_connect(fresh_pg)

    fresh_pg.start()  # crash recovery on the same data dir and port
    with _pg_connect(fresh_pg) as conn:
        assert conn.execute("SELECT count(*) FROM survivor").fetchone() == (1000,)
    base = fresh_pg.base
    fresh_pg.stop()
    assert not base.exists()
    fresh_pg.stop()  # twice is fine


@pytest.fixture
def searchable_tmp() -> Iterator[Path]:
    """A temp dir the postgres OS user can enter (pytest's tmp_path lives under a 0700 dir)."""
    path = Path(tempfile.mkdtemp(prefix="test-scratch-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_postgres_start_failure_names_the_cause_and_cleans_up(searchable_tmp: Path) -> None:
    server = ScratchPostgres(settings={"shared_buffers": "not-a-size"}, fast=True, base_dir=str(searchable_tmp))
    with pytest.raises(RuntimeError, match="invalid value for parameter \"shared_buffers\""):
        server.start()
    assert list(searchable_tmp.iterdir()) == []
    assert not server.is_running()


@pytest.mark.root
def test_postgres_base_dir_the_postgres_user_cannot_reach_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="postgres OS user cannot reach"):
        ScratchPostgres(fast=True, base_dir=str(tmp_path)).start()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- redis


def test_redis_requires_its_password(redis_server: ScratchRedis) -> None:
    assert redis_server.password
    client = redis.Redis(host=redis_server.host, port=redis_server.port, password=redis_server.password)
    client.set("scratch:probe", b"\x00value")
    assert client.get("scratch:probe") == b"\x00value"
    client.delete("scratch:probe")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=redis_server.host, port=redis_server.port, retry=Retry(NoBackoff(), 0)).get("x")
    assert redis.Redis.from_url(redis_server.url).ping()
    assert redis_server.password not in repr(redis_server)


def test_redis_persists_nothing_by_itself(scratch_redis: ScratchRedis) -> None:
    client = scratch_redis.client()
    assert client.config_get("save") == {"save": ""}
    assert client.config_get("appendonly") == {"appendonly": "no"}
    client.set("k", "v")
    assert not scratch_redis.rdb_path.exists()


def test_redis_loads_an_rdb_file_at_start(scratch_redis: ScratchRedis, tmp_path: Path) -> None:
    source = scratch_redis.client()
    source.set("string", "value")
    source.hset("hash", mapping={"a": "1", "b": b"\xff"})
    source.rpush("list", "x", "y", "z")
    source.set("ttl", "soon", ex=3600)
    source.save()
    rdb = tmp_path / "copy.rdb"
    rdb.write_bytes(scratch_redis.rdb_path.read_bytes())

    with ScratchRedis(password="loaded-pw", rdb_file=rdb) as loaded:
        target = loaded.client()
        assert target.get("string") == b"value"
        assert target.hgetall("hash") == {b"a": b"1", b"b": b"\xff"}
        assert target.lrange("list", 0, -1) == [b"x", b"y", b"z"]
        assert 3000 < target.ttl("ttl") <= 3600
        assert target.dbsize() == source.dbsize() == 4
    assert rdb.exists()  # the caller's file is copied, never moved


def test_redis_kill_then_stop(tmp_path: Path) -> None:
    server = ScratchRedis(base_dir=str(tmp_path)).start()
    client = server.client(socket_timeout=2, retry=Retry(NoBackoff(), 0))
    assert client.ping()
    server.kill()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    server.stop()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ s3


def test_s3_put_get_list_with_the_sandbox_credentials(s3: SeaweedS3) -> None:
    client = s3.client()
    body = bytes(range(256)) * 4096  # 1 MiB
    client.put_object(Bucket=s3.bucket, Key="scratch/probe.bin", Body=body)
    assert client.get_object(Bucket=s3.bucket, Key="scratch/probe.bin")["Body"].read() == body
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix="scratch/")
    assert [(o["Key"], o["Size"]) for o in listed["Contents"]] == [("scratch/probe.bin", len(body))]
    assert s3.bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]
    client.delete_object(Bucket=s3.bucket, Key="scratch/probe.bin")


def test_s3_rejects_wrong_credentials(s3: SeaweedS3) -> None:
    import boto3

    intruder = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name=s3.region,
                            aws_access_key_id=s3.access_key, aws_secret_access_key="wrong-secret",
                            config=Config(retries={"max_attempts": 1}))
    with pytest.raises(ClientError) as error:
        intruder.list_objects_v2(Bucket=s3.bucket)
    assert error.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied")


def test_s3_create_bucket_is_idempotent(s3: SeaweedS3) -> None:
    assert s3.create_bucket("scratch-second") == "scratch-second"
    assert s3.create_bucket("scratch-second") == "scratch-second"
    s3.client().delete_bucket(Bucket="scratch-second")


# ------------------------------------------------------------------------------------------- faults


def test_proxy_go_down_and_come_up_in_front_of_s3(
    s3: SeaweedS3, faulty_proxy: Callable[[str, int], FaultyProxy]
) -> None:
    proxy = faulty_proxy(s3.host, s3.port)
    client = s3.client(f"http://127.0.0.1:{proxy.url_port}", retries={"max_attempts": 1}, connect_timeout=2,
                       read_timeout=5)
    client.put_object(Bucket=s3.bucket, Key="proxied", Body=b"through the proxy")
    assert proxy.bytes_up > 0 and proxy.bytes_down > 0

    proxy.go_down()
    with pytest.raises((BotoCoreError, ClientError)):
        client.get_object(Bucket=s3.bucket, Key="proxied")
    proxy.come_up()
    assert client.get_object(Bucket=s3.bucket, Key="proxied")["Body"].read() == b"through the proxy"
    client.delete_object(Bucket=s3.bucket, Key="proxied")


def test_proxy_go_down_resets_a_live_postgres_session(
    pg: ScratchPostgres, faulty_proxy: Callable[[str, int], FaultyProxy]
) -> None:
    proxy = faulty_proxy(pg.host, pg.port)
    with _pg_connect(pg, port=proxy.port) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        proxy.go_down(seconds=0.5)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        _pg_connect(pg, port=proxy.port)
    _wait_until(lambda: not proxy.is_down)
    with _pg_connect(pg, port=proxy.port) as conn:  # the timer brought it back
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_proxy_trip_after_bytes_cuts_an_upload_then_recovers(
    redis_server: ScratchRedis, faulty_proxy: Callable[[str, int], FaultyProxy]
) -> None:
    proxy = faulty_proxy(redis_server.host, redis_server.port)
    client = redis.Redis(host=proxy.host, port=proxy.port, password=redis_server.password,
                         socket_timeout=5, retry=Retry(NoBackoff(), 0))
    assert client.ping()
    proxy.trip_after_bytes(100_000, down_for_seconds=1.0)
    with pytest.raises(redis.ConnectionError):
        client.set("scratch:big", b"x" * 1_000_000)
    assert proxy.is_down
    assert redis_server.client().exists("scratch:big") == 0  # the server never got the whole value
    _wait_until(lambda: not proxy.is_down)
    client.set("scratch:small", b"ok")
    assert redis_server.client().get("scratch:small") == b"ok"
    redis_server.client().delete("scratch:small")


def test_proxy_stops_by_itself_after_its_lifetime() -> None:
    with socket.create_server(("127.0.0.1", 0)) as target:
        proxy = FaultyProxy("127.0.0.1", target.getsockname()[1], max_lifetime=0.3).start()
        port = proxy.port
        _wait_until(lambda: not proxy.running)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1)
