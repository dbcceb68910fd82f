"""The `backup` flow end to end against real PostgreSQL, Redis and SeaweedFS S3, restored and compared."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import psycopg
import pytest
from pydantic import SecretStr

from blocks.postgres import PostgresConnection
from blocks.redis import RedisConnection
from blocks.store import BackupStore
from deployments.cli import main as cli_main
from flows.backup import backup
from flows.restore import restore_set
from tasks.files import tree_digest
from tasks.manifest import human_size
from tasks.pg_checksums import collect_checksums
from tasks.redis import keyspace_digest
from tasks.scratch import ScratchPostgres
from tasks.store import list_sets
from tests.faults import FaultyProxy

pytestmark = pytest.mark.e2e

ODD_DB = "Sales \"EU\" Q'1"  # upper case, a space, double and single quotes
ROLE_PASSWORD = "r0le-pw-for-test"


def _seed(pg: PostgresConnection) -> None:
    with pg.connect(autocommit=True) as admin:
        admin.execute(f"CREATE ROLE reporter LOGIN PASSWORD '{ROLE_PASSWORD}'")
        admin.execute('CREATE DATABASE "Sales ""EU"" Q\'1" OWNER reporter')
        admin.execute("CREATE DATABASE inventory")
    with pg.connect(ODD_DB, autocommit=True) as conn:
        conn.execute("""
            CREATE SCHEMA billing; CREATE SCHEMA "Audit Log";
            CREATE TABLE billing.invoices (id bigserial PRIMARY KEY, customer text, amount numeric(12,2),
                                           doc jsonb, pdf bytea, issued timestamptz, ratio float8);
            INSERT INTO billing.invoices (customer, amount, doc, pdf, issued, ratio)
            SELECT 'c' || (g % 977), (g % 10000) / 7.0,
                   jsonb_build_object('lines', jsonb_build_array(g, g * 2), 'note', md5(g::text)),
                   decode(md5(g::text) || md5((g + 1)::text), 'hex'),
                   timestamptz '2026-01-01' + g * interval '1 minute', g / 3.0
            FROM generate_series(1, 100000) g;
            CREATE TABLE "Audit Log"."Events" (at timestamptz, what text);
            INSERT INTO "Audit Log"."Events" SELECT now() - g * interval '1 s', 'e' || g FROM generate_series(1, 500) g;
            CREATE SEQUENCE billing.invoice_no START 1000;
            SELECT setval('billing.invoice_no', 4242);
            GRANT USAGE ON SCHEMA billing TO reporter;
            GRANT SELECT ON ALL TABLES IN SCHEMA billing TO reporter;
        """)
    with pg.connect("inventory", autocommit=True) as conn:
        conn.execute("CREATE TABLE items AS SELECT g AS id, 'item ' || g AS name FROM generate_series(1, 1000) g")


def _redis_seed(client) -> None:
    pipe = client.pipeline()
    for i in range(2000):
        pipe.set(f"k:{i}", f"v{i}")
    pipe.hset("h", mapping={"a": "1", "b": b"\x00\xff"})
    pipe.zadd("z", {"x": 1.5, "y": -2})
    pipe.rpush("l", *range(50))
    pipe.set("ttl", "soon", ex=3600)
    pipe.execute()


@pytest.fixture(scope="module")
def source(pg, redis_server, tmp_path_factory):
    conn = PostgresConnection.from_url(pg.url)
    _seed(conn)
    rconn = RedisConnection.from_url(redis_server.url)
    _redis_seed(rconn.get_client())
    media = tmp_path_factory.mktemp("media")
    (media / "img").mkdir()
    for i in range(5):
        (media / "img" / f"{i}.bin").write_bytes(bytes([i]) * (1000 * (i + 1)))
    return conn, rconn, media


def _s3_store(s3, prefix: str, endpoint: str | None = None, **extra) -> BackupStore:
    return BackupStore(backend="s3", bucket=s3.bucket, prefix=prefix, endpoint_url=endpoint or s3.endpoint_url,
                       region=s3.region, access_key_id=SecretStr(s3.access_key),
                       secret_access_key=SecretStr(s3.secret_key), **extra)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_round_trip_restores_identical_data(backend, source, fresh_pg, scratch_redis, prefect_harness, s3,
                                            tmp_path):
    pg, rconn, media = source
    store = (BackupStore.from_url(f"file://{tmp_path}/store") if backend == "local"
             else _s3_store(s3, f"roundtrip-{time.time_ns()}", part_size_mib=5))
    result = backup(store=store, postgres=pg, redis=rconn, paths=[str(media)], tags=["test"], retries=0)
    sets = list_sets(store.get_client())
    assert [m.set_id for m in sets] == [result.set_id]
    manifest = sets[0]
    assert {p.kind for p in manifest.parts} == {"globals", "postgres", "redis", "files"}
    assert {p.name for p in manifest.parts if p.kind == "postgres"} >= {ODD_DB, "inventory", "postgres"}

    target = PostgresConnection.from_url(fresh_pg.url)
    target_redis = RedisConnection.from_url(scratch_redis.url)
    restore_set(store=store, backup_id=result.set_id, postgres=target, databases=[ODD_DB, "inventory"],
                redis=target_redis,
                files_root=str(tmp_path / "files"))

    for database in (ODD_DB, "inventory"):
        with pg.connect(database) as a, target.connect(database) as b:
            before, after = collect_checksums(a), collect_checksums(b)
        assert before == after and before
    with target.connect(ODD_DB) as conn:
        assert conn.execute("SELECT last_value FROM billing.invoice_no").fetchone()[0] == 4242
        assert conn.execute("SELECT count(*) FROM billing.invoices").fetchone()[0] == 100000
    with target.connect(ODD_DB, user="reporter", password=ROLE_PASSWORD) as conn:
        assert conn.execute("SELECT count(*) FROM billing.invoices WHERE pdf IS NOT NULL").fetchone()[0] == 100000
    assert keyspace_digest(rconn) == keyspace_digest(target_redis)
    assert target_redis.get_client().get("k:1999") == b"v1999"
    restored_dir = next((tmp_path / "files").iterdir())
    assert tree_digest(restored_dir) == tree_digest(media)


def test_postgres_killed_during_dump_leaves_no_backup(prefect_harness, tmp_path, capsys):
    victim = ScratchPostgres(password="victim-pw", fast=True)
    victim.start()
    try:
        conn = PostgresConnection.from_url(victim.url)
        with conn.connect(autocommit=True) as c:
            c.execute("CREATE TABLE big AS SELECT g, md5(g::text) || repeat('x', 500) AS pad "
                      "FROM generate_series(1, 600000) g")
        store = BackupStore.from_url(f"file://{tmp_path}/store")

        def kill_when_copying() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    with psycopg.connect(victim.url, autocommit=True) as watch:
                        busy = watch.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY public.big%'"
                        ).fetchone()[0]
                except psycopg.Error:
                    busy = 0
                if busy:
                    victim.kill()
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_when_copying)
        killer.start()
        state = backup(store=store, postgres=conn, include_globals=False, retries=1, retry_delay_seconds=0.2,
                       return_state=True)
        killer.join()
        assert state.is_failed()
        assert list_sets(store.get_client()) == []
        assert store.get_client().list() == []  # the failed set's parts were discarded
        capsys.readouterr()
        assert cli_main(["backup", "list", "--store", f"file://{tmp_path}/store", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == []
    finally:
        victim.stop()


def test_s3_down_during_upload_fails_naming_store_and_aborts_uploads(source, s3, prefect_harness, monkeypatch):
    import flows.backup

    pg, _, _ = source
    with pg.connect(autocommit=True) as admin:
        admin.execute("CREATE DATABASE noise")
    with pg.connect("noise", autocommit=True) as conn:  # ~24 MB that zstd cannot shrink: many parts
        conn.execute("CREATE TABLE blobs AS SELECT g, (SELECT decode(string_agg(md5(random()::text || g || i), ''), "
                     "'hex') FROM generate_series(1, 1000) i) AS b FROM generate_series(1, 1500) g")
    proxy = FaultyProxy("127.0.0.1", s3.port)
    proxy.start()
    try:
        prefix = f"outage-{time.time_ns()}"
        store = _s3_store(s3, prefix, endpoint=f"http://127.0.0.1:{proxy.port}", part_size_mib=5)
        # The endpoint goes away after ~8 MiB (one part done) and stays away until the dump's last attempt has
        # failed: the flow's cleanup, which runs right after it, brings it back and must find it reachable.
        proxy.trip_after_bytes(8 * 2**20, down_for_seconds=None)
        at_cleanup: list[tuple[bool, int]] = []
        discard = flows.backup.discard_incomplete_set

        def outage_ends_at_cleanup(*args, **kwargs):
            at_cleanup.append((proxy.is_down, proxy.resets))
            proxy.come_up()
            return discard(*args, **kwargs)

        monkeypatch.setattr(flows.backup, "discard_incomplete_set", outage_ends_at_cleanup)
        state = backup(store=store, postgres=pg, databases=["noise"], include_globals=False,
                       compression_level=1, retries=1, retry_delay_seconds=1, return_state=True)
        assert state.is_failed()
        # Both attempts of the dump met the outage: the first cut mid-upload, the retry refused.
        [(down, resets)] = at_cleanup
        assert down and resets >= 2, (down, resets)
        assert f"s3://{s3.bucket}/{prefix}" in state.message or f"s3://{s3.bucket}/{prefix}" in str(
            state.result(raise_on_failure=False))
        direct = _s3_store(s3, prefix).get_client()
        assert list_sets(direct) == []
        assert direct.list() == []
        uploads = direct.client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix).get("Uploads", [])
        assert uploads == []
    finally:
        proxy.stop()


def test_wrong_password_is_clear_and_never_leaks(pg, prefect_harness, tmp_path, caplog):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    received: list[bytes] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args) -> None:
            pass

    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    CustomWebhookNotificationBlock(
        name="ops", url=f"http://127.0.0.1:{hook.server_port}/notify", allow_private_urls=True,
        json_data={"subject": "{{subject}}", "text": "{{body}}"},
    ).save("test-ops", overwrite=True)

    secret = "Wr0ng-Pa55word-XYZZY"
    bad = PostgresConnection(host="127.0.0.1", port=pg.port, user="postgres", password=SecretStr(secret),
                             database="inventory")
    store = BackupStore.from_url(f"file://{tmp_path}/store")
    state = backup(store=store, postgres=bad, databases=["inventory"], retries=0,
                   notify_block="custom-webhook/test-ops",
                   return_state=True)
    hook.shutdown()
    assert state.is_failed()
    assert len(received) == 1, "the notification block was told of the failure"
    sent = json.loads(received[0])
    assert "backup FAILED" in sent["subject"] and "password authentication failed" in sent["text"]
    assert secret not in received[0].decode()
    error = state.result(raise_on_failure=False)
    assert f"127.0.0.1:{pg.port}/" in str(error) and "password authentication failed" in str(error)
    assert secret not in str(error) and secret not in (state.message or "")
    APILogHandler().flush()
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run_id])))
        run = client.read_flow_run(run_id)
    assert logs, "the run's logs reached the API"
    assert all(secret not in log.message for log in logs)
    assert all(secret not in json.dumps(a.data, default=str) for a in artifacts)
    assert secret not in json.dumps(run.parameters, default=str)
    assert secret not in caplog.text
    assert list_sets(store.get_client()) == []


def test_backup_list_and_show_read_manifests_only(source, prefect_harness, tmp_path, capsys):
    pg, _, _ = source
    store_url = f"file://{tmp_path}/store"
    result = backup(store=BackupStore.from_url(store_url), postgres=pg, databases=["inventory"], retries=0)
    # A set without a manifest (a crashed run) is not listed.
    stray = Path(tmp_path, "store/backups/20200101T000000Z-abcdef/postgres")
    stray.mkdir(parents=True)
    (stray / "x.dump.zst").write_bytes(b"junk")
    capsys.readouterr()
    assert cli_main(["backup", "list", "--store", store_url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["set_id"] for s in listed] == [result.set_id]
    assert cli_main(["backup", "show", result.set_id, "--store", store_url]) == 0
    shown = capsys.readouterr().out
    assert "public.items" in shown and "rows       1000" in shown
    [manifest] = list_sets(BackupStore.from_url(store_url).get_client())
    assert sum(p.size for p in manifest.parts) == result.size and manifest.parts
    for part in manifest.parts:  # each part's line shows its stored and raw size
        assert f" {part.name} " in shown and f"{human_size(part.size)} (raw {human_size(part.raw_size)})" in shown
    assert cli_main(["backup", "show", "20200101T000000Z-abcdef", "--store", store_url]) == 2
    assert "nearest: " + result.set_id in capsys.readouterr().err
