"""PostgresConnection over TLS against a real PostgreSQL with a CA made in the test: verify-full by default once
a CA is given, client certificates (key given as a secret, written 0600 for libpq), clear errors for a wrong CA,
a wrong host name or no client certificate, and pg_dump / pg_restore / pg_basebackup on the same settings.

The server requires TLS and a client certificate on every TCP connection (``hostnossl ... reject``), so a tool
that ignored the Block's TLS settings could not connect at all."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from blocks.errors import ConnectionFailed
from blocks.postgres import PostgresConnection
from blocks.store import BackupStore
from tasks.scratch import ScratchPostgres
from tests.tls import Issued, TestCA

pytestmark = pytest.mark.e2e


class TlsServer:
    def __init__(self, pg: ScratchPostgres, ca: TestCA, client: Issued, other_ca: TestCA) -> None:
        self.pg, self.ca, self.client, self.other_ca = pg, ca, client, other_ca
        self.client_key = SecretStr(Path(client.key).read_text())  # (secret_scan looks for it in logs too)

    def block(self, **fields: object) -> PostgresConnection:
        values: dict[str, object] = {
            "host": "127.0.0.1", "port": self.pg.port, "user": "postgres", "password": SecretStr(self.pg.password),
            "sslrootcert": Path(self.ca.cert).read_text(), "sslcert": Path(self.client.cert).read_text(),
            "sslkey": self.client_key}
        values.update(fields)
        return PostgresConnection(**values)


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    work = tmp_path_factory.mktemp("pg-tls")
    ca = TestCA(work / "ca")
    server = ca.issue("pg-server", hosts=("127.0.0.1", "localhost"))
    client = ca.issue("postgres", client=True)  # clientcert=verify-full: the CN is the user name
    other = TestCA(work / "other", "other CA")
    with ScratchPostgres(password=secrets.token_urlsafe(16), fast=True, ssl_cert_file=server.cert,
                         ssl_key_file=server.key, ssl_client_ca_file=ca.cert) as pg:
        yield TlsServer(pg, ca, client, other)


def test_a_ca_makes_verify_full_the_default_and_the_session_is_tls_with_the_client_certificate(tls_pg):
    block = tls_pg.block()
    assert block.effective_sslmode == "verify-full"
    assert PostgresConnection(host="h").effective_sslmode == "prefer"  # no CA: unchanged default
    with block.connect() as conn:
        ssl, client_dn = conn.execute(
            "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert ssl is True and client_dn == "/CN=postgres"
    env = block.libpq_env()
    assert env["PGSSLMODE"] == "verify-full"
    for name in ("PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"):
        path = Path(env[name])
        assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert Path(env["PGSSLKEY"]).read_text().strip() == Path(tls_pg.client.key).read_text().strip()
    assert "PRIVATE KEY" not in repr(block) and "PRIVATE KEY" not in str(block.model_dump())  # a secret


def test_wrong_ca_wrong_host_missing_client_cert_and_plaintext_fail_with_clear_errors(tls_pg):
    key_text = Path(tls_pg.client.key).read_text()
    cases = [
        (tls_pg.block(sslrootcert=Path(tls_pg.other_ca.cert).read_text()), {}, "does not chain to sslrootcert"),
        (tls_pg.block(host="db.wrong.example"), {"hostaddr": "127.0.0.1"}, "not for this host name"),
        (tls_pg.block(sslcert=None, sslkey=None), {}, "certificate"),
        (tls_pg.block(sslmode="disable"), {}, "no encryption"),
    ]
    for block, extra, message in cases:
        with pytest.raises(ConnectionFailed, match=message) as caught:
            block.connect(**extra).close()
        text = str(caught.value)
        assert tls_pg.pg.password not in text and key_text.splitlines()[1] not in text
    with pytest.raises(ValueError, match="go together"):
        tls_pg.block(sslkey=None)
    with pytest.raises(ValueError, match="sslmode"):
        tls_pg.block(sslmode="verify_full")


def test_pg_dump_pg_restore_and_pg_basebackup_use_the_same_tls_settings(tls_pg, tmp_path):
    from tasks.manifest import new_set_id
    from tasks.pg_checksums import collect_checksums
    from tasks.pitr.base_backup import take_base_backup
    from tasks.postgres import dump_database, restore_database

    block = tls_pg.block()
    with block.connect(autocommit=True) as admin:
        admin.execute("CREATE DATABASE shop")
    with block.connect("shop", autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO orders SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
    store = BackupStore.from_url(f"file://{tmp_path / 'store'}")
    set_id = new_set_id()
    part = dump_database.fn(block, "shop", store, set_id)  # pg_dump
    restore_database.fn(part, store, block, "shop_copy")  # pg_restore
    with block.connect("shop") as a, block.connect("shop_copy") as b:
        assert collect_checksums(a) == collect_checksums(b)
    taken = take_base_backup.fn(block, store, new_set_id(), use_pg_basebackup=True)  # pg_basebackup
    tar = taken.parts[0]
    data = store.get_client().get_bytes(tar.key)
    assert len(data) == tar.size and hashlib.sha256(data).hexdigest() == tar.sha256
    # and the same tools with the CA of another authority cannot connect
    wrong = tls_pg.block(sslrootcert=Path(tls_pg.other_ca.cert).read_text())
    with pytest.raises(Exception, match="certificate verify failed|does not chain"):
        dump_database.fn(wrong, "shop", store, new_set_id())
    assert os.environ.get("PGSSLKEY") is None  # nothing leaked into this process's environment
