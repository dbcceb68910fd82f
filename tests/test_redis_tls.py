"""RedisConnection over rediss:// against Debian's redis-server (built with TLS) with a CA made in the test:
the server's certificate and host name are checked, a client certificate (key given as a secret) is presented,
and the replication snapshot of a backup (its own raw TLS socket) uses the same settings."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from blocks.errors import ConnectionFailed
from blocks.redis import RedisConnection
from blocks.store import BackupStore
from tasks.scratch_redis import ScratchRedis
from tests.tls import TestCA

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ScratchRedis, TestCA, TestCA]]:
    work = tmp_path_factory.mktemp("redis-tls")
    ca = TestCA(work / "ca")
    server = ca.issue("redis-server")
    client = ca.issue("runbooks", client=True)
    other = TestCA(work / "other", "other CA")
    with ScratchRedis(password=secrets.token_urlsafe(16), tls_cert_file=server.cert, tls_key_file=server.key,
                      tls_ca_file=ca.cert, tls_client=(client.cert, client.key)) as server_proc:
        server_proc.client_pem = (Path(client.cert).read_text(), Path(client.key).read_text())  # type: ignore[attr-defined]
        yield server_proc, ca, other


def _block(server: ScratchRedis, ca: TestCA, **fields: object) -> RedisConnection:
    cert, key = server.client_pem  # type: ignore[attr-defined]
    values: dict[str, object] = {"host": "127.0.0.1", "port": server.port, "password": SecretStr(server.password),
                                 "tls": True, "tls_ca_file": Path(ca.cert).read_text(), "tls_cert_file": cert,
                                 "tls_key": SecretStr(key)}
    values.update(fields)
    return RedisConnection(**values)


def test_rediss_with_a_client_certificate_and_the_snapshot_over_the_same_tls(tls_redis, tmp_path):
    from tasks.manifest import new_set_id
    from tasks.redis import keyspace_digest, snapshot_redis

    server, ca, _other = tls_redis
    block = _block(server, ca)
    client = block.get_client()
    for i in range(200):
        client.set(f"k{i}", secrets.token_hex(8))
    assert client.dbsize() == 200
    store = BackupStore.from_url(f"file://{tmp_path / 'store'}")
    part = snapshot_redis.fn(block, store, new_set_id())  # the replication link: a raw TLS socket
    assert part.redis is not None and part.redis.key_count == 200
    assert part.redis.digest == keyspace_digest(block).digest


def test_wrong_ca_wrong_host_and_no_client_certificate_are_refused(tls_redis):
    from tasks.redis_replication import stream_rdb

    server, ca, other = tls_redis
    wrong_ca = _block(server, ca, tls_ca_file=Path(other.cert).read_text())
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        wrong_ca.get_client().ping()
    with pytest.raises(ConnectionFailed, match="certificate verify failed"):
        stream_rdb(wrong_ca, io.BytesIO(), timeout=10)
    # A server whose certificate names another host: the host name check refuses it (redis-py and the raw link).
    other_name = ca.issue("elsewhere", hosts=("db.elsewhere.example",))
    with ScratchRedis(password=server.password, tls_cert_file=other_name.cert, tls_key_file=other_name.key,
                      tls_ca_file=ca.cert, tls_client=None) as elsewhere:
        elsewhere.client_pem = server.client_pem  # type: ignore[attr-defined]
        misnamed = _block(elsewhere, ca, password=SecretStr(server.password))
        with pytest.raises(redis.ConnectionError, match="match|mismatch|hostname"):
            misnamed.get_client().ping()
        with pytest.raises(ConnectionFailed, match="match|mismatch|hostname"):
            stream_rdb(misnamed, io.BytesIO(), timeout=10)
    no_cert = _block(server, ca, tls_cert_file=None, tls_key=None)
    with pytest.raises((redis.ConnectionError, ConnectionResetError)):
        no_cert.get_client().ping()
    with pytest.raises(ValueError, match="go together"):
        _block(server, ca, tls_key=None)
