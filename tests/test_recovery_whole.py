"""`disaster-recovery` is all or nothing, against real PostgreSQL, Redis, a directory and an HTTP app.

'Production' is a whole cluster reached with the default connection URL (database ``postgres``): the
``postgres`` database itself, an application database with non-default properties (owner, privileges,
settings, comment, LATIN1 encoding, a large object, sequences), a database whose name needs quoting, roles,
a Redis and a media directory. Every test compares fingerprints of all of it: table checksums, large
objects, database properties, the Redis keyspace digest and the directory's tree digest.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from blocks.app import AppEndpoint
from blocks.errors import PreflightFailed
from blocks.postgres import PostgresConnection
from blocks.redis import RedisConnection
from blocks.store import BackupStore
from deployments.cli import main as cli_main
from flows.backup import backup
from flows.disaster_recovery import disaster_recovery
from flows.restore import restore_set
from tasks.databases import Swap, preflight_swap, read_properties
from tasks.files import tree_digest
from tasks.pg_checksums import collect_checksums
from tasks.recovery import read_journal, read_journals
from tasks.redis import keyspace_digest
from tests.app_fixture import FakeApp

pytestmark = pytest.mark.e2e
TOKEN = "app-maintenance-token-whole"
ODD = 'odd "name".* é'
SIDE_MARKS = ("__pre_restore_", "__restore_")


def _setup_cluster(conn: PostgresConnection) -> None:
    with conn.connect(autocommit=True) as c:
        c.execute("CREATE ROLE alice LOGIN")
        c.execute("CREATE ROLE bob")
        c.execute("CREATE DATABASE shop OWNER alice TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' "
                  "LC_CTYPE 'C' CONNECTION LIMIT 50")
        c.execute("COMMENT ON DATABASE shop IS 'the shop''s data'")
        c.execute("REVOKE ALL ON DATABASE shop FROM PUBLIC")
        c.execute("GRANT CONNECT ON DATABASE shop TO bob")
        c.execute("GRANT CREATE ON DATABASE shop TO bob WITH GRANT OPTION")
        c.execute("ALTER DATABASE shop SET search_path TO \"$user\", public, extra")
        c.execute("ALTER DATABASE shop SET work_mem TO '8MB'")
        c.execute("ALTER ROLE bob IN DATABASE shop SET statement_timeout TO '5s'")
        c.execute(f'CREATE DATABASE "{ODD.replace(chr(34), chr(34) * 2)}"')
        c.execute("CREATE DATABASE icu TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'de-DE' LC_COLLATE 'C' "
                  "LC_CTYPE 'C'")
        c.execute("CREATE TABLE ops_notes (id serial PRIMARY KEY, note text)")
        c.execute("INSERT INTO ops_notes (note) SELECT 'note ' || g FROM generate_series(1, 500) g")
    with conn.connect("shop", autocommit=True) as c:
        c.execute("""
            CREATE TABLE app_meta (version text);
            INSERT INTO app_meta VALUES ('v1');
            CREATE TABLE orders (id bigserial PRIMARY KEY, customer text, total numeric(10,2));
            INSERT INTO orders (customer, total) SELECT 'c' || g, g / 4.0 FROM generate_series(1, 5000) g;
            CREATE SEQUENCE invoice_no START 1000;
            SELECT nextval('invoice_no') FROM generate_series(1, 7);
            SELECT lo_from_bytea(0, convert_to(repeat('large object ', 500), 'LATIN1'));
            ALTER TABLE orders OWNER TO alice;
        """)
    with conn.connect("icu", autocommit=True) as c:
        c.execute("CREATE TABLE words AS SELECT w FROM unnest(ARRAY['Äpfel', 'Zebra', 'apfel']) w")
        c.execute("CREATE INDEX ON words (w)")
    with conn.connect(ODD, autocommit=True) as c:
        c.execute('CREATE TABLE "we""ird" (k int)')
        c.execute('INSERT INTO "we""ird" SELECT generate_series(1, 100)')


def _fill_redis(conn: RedisConnection, keys: int = 2000, size: int = 1000) -> None:
    client = conn.get_client()
    pipe = client.pipeline(transaction=False)
    for i in range(keys):
        pipe.set(f"session:{i}", os.urandom(size // 2).hex())
    pipe.hset("cart:1", mapping={"sku": "A", "qty": "2"})
    pipe.execute()
    conn.get_client(db=3).set("other-db", "x")


@pytest.fixture
def production(fresh_pg, scratch_redis, tmp_path):
    pg = PostgresConnection.from_url(fresh_pg.url)
    assert pg.database == "postgres"
    _setup_cluster(pg)
    redis = RedisConnection.from_url(scratch_redis.url)
    _fill_redis(redis)
    media = tmp_path / "media"
    (media / "img").mkdir(parents=True)
    for i in range(4):
        (media / "img" / f"{i}.png").write_bytes(bytes([i]) * 4096)
    (media / "link").symlink_to("img/0.png")
    app_url = fresh_pg.url.rsplit("/", 1)[0] + "/shop"
    # The application (the version live now) needs schema v2: the backup holds v1, the damaged live data v2.
    with FakeApp(app_url, TOKEN, health_sql="SELECT true") as app:
        endpoint = AppEndpoint(base_url=app.base_url, auth_value=SecretStr(f"Bearer {TOKEN}"))
        yield {"pg": pg, "redis": redis, "media": media, "app": app, "endpoint": endpoint, "server": fresh_pg,
               "redis_server": scratch_redis, "store": BackupStore.from_url(f"file://{tmp_path}/store"),
               "store_path": tmp_path / "store"}


def _databases(pg: PostgresConnection) -> list[str]:
    with pg.connect() as c:
        return sorted(r[0] for r in c.execute("SELECT datname FROM pg_database WHERE NOT datistemplate"))


def _database_fingerprint(pg: PostgresConnection, name: str) -> dict[str, Any]:
    with pg.connect(name) as c:
        tables = [t.model_dump() for t in collect_checksums(c)]
        objects = c.execute("SELECT oid::bigint, md5(lo_get(oid)) FROM pg_largeobject_metadata ORDER BY 1").fetchall()
    with pg.connect("template1") as c:
        props = read_properties(c, name).model_dump()
    return {"tables": tables, "large_objects": objects, "properties": props}


def fingerprint(s: dict[str, Any]) -> dict[str, Any]:
    live = [d for d in _databases(s["pg"]) if not any(m in d for m in SIDE_MARKS)]
    return {"databases": {d: _database_fingerprint(s["pg"], d) for d in live},
            "redis": keyspace_digest(s["redis"]).model_dump(), "files": tree_digest(s["media"]).model_dump()}


def _backup(s: dict[str, Any]) -> str:
    """The shipped nightly's parameters: every database, globals, Redis, plus the media directory."""
    return backup(store=s["store"], postgres=s["pg"], redis=s["redis"], include_globals=True,
                  paths=[str(s["media"])], retries=0).set_id


def _damage(s: dict[str, Any]) -> None:
    with s["pg"].connect("shop", autocommit=True) as c:
        c.execute("UPDATE app_meta SET version = 'v2'")
        c.execute("DELETE FROM orders WHERE id % 3 = 0")
        c.execute("SELECT nextval('invoice_no')")
    with s["pg"].connect(autocommit=True) as c:
        c.execute("DELETE FROM ops_notes WHERE id > 100")
        c.execute("ALTER DATABASE shop OWNER TO bob")
        c.execute("ALTER DATABASE shop RESET work_mem")
        c.execute("COMMENT ON DATABASE shop IS 'changed'")
    client = s["redis"].get_client()
    client.flushall()
    client.set("session:new", "only this one")
    (s["media"] / "img" / "0.png").write_bytes(b"overwritten")
    (s["media"] / "new.txt").write_text("new")


def _recover(s: dict[str, Any], set_id: str, **more: Any) -> Any:
    return disaster_recovery(store=s["store"], backup_id=set_id, postgres=s["pg"], redis=s["redis"],
                             app=s["endpoint"], confirm=True, return_state=True, **more)


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                           limit=1, sort="CREATED_DESC")
    return str(artifact.data)


def test_full_set_with_the_default_connection_is_restored_whole(production, prefect_harness):
    s = production
    good = fingerprint(s)
    assert good["databases"]["shop"]["properties"]["encoding"] == "LATIN1"
    assert good["databases"]["icu"]["properties"]["icu_locale"] == "de-DE"
    set_id = _backup(s)
    _damage(s)
    damaged = fingerprint(s)
    assert damaged != good

    state = _recover(s, set_id)

    assert state.is_completed(), state
    result = state.result()
    assert set(result.restore_steps) == {"postgres", "shop", "icu", ODD}  # each restore beside, step by step
    assert all(steps["create database"] >= 0 for steps in result.restore_steps.values())
    after = fingerprint(s)
    assert after == good  # every table, sequence, large object, property, Redis key and file
    assert set(after["databases"]) == {"postgres", "shop", "icu", ODD}
    for name in ("postgres", "shop", "icu", ODD):  # the replaced databases are kept, unchanged, under their kept names
        kept = result.kept[f"postgres:{name}"]
        assert _database_fingerprint(s["pg"], kept)["tables"] == damaged["databases"][name]["tables"]
    assert Path(result.kept[f"files:{s['media']}"]).is_dir()
    assert [e for e, _ in s["app"].events] == ["on", "off"]
    assert not [d for d in _databases(s["pg"]) if "__restore_" in d]  # nothing left beside
    # The live Redis before the swap is in the store, with the damaged keyspace's digest.
    journal = read_journal(s["store"].get_client(), result.recovery_id)
    assert journal.phase == "recovered" and journal.redis_safety_copy.redis.digest == damaged["redis"]["digest"]
    report = _artifact("recovery-report")
    assert "DONE" in report and result.kept["postgres:shop"] in report


@pytest.mark.parametrize("fault", ["redis-out-of-memory", "directory-rename", "unhealthy-new-data",
                                   "never-healthy"])
def test_a_fault_in_the_commit_phase_leaves_production_as_before(fault, production, prefect_harness, monkeypatch):
    s = production
    set_id = _backup(s)
    _damage(s)
    if fault == "redis-out-of-memory":  # the snapshot does not fit, what is there now does
        client = s["redis"].get_client()
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 600_000)
    elif fault == "directory-rename":
        real_rename = os.rename
        live = str(s["media"])

        def refuse(src: Any, dst: Any) -> None:
            if str(dst) == live and ".restore-" in str(src):
                raise OSError(errno.EBUSY, "Device or resource busy", live)
            real_rename(src, dst)

        monkeypatch.setattr("tasks.files.os.rename", refuse)
    elif fault == "unhealthy-new-data":
        s["app"].health_sql = "SELECT version = 'v2' FROM app_meta"  # the live app needs the live schema
    else:
        s["app"].healthy = False
    before = fingerprint(s)

    state = _recover(s, set_id, health_timeout_seconds=3)

    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert fingerprint(s) == before  # databases (names, data, properties), Redis and files as before the run
    journal = read_journals(s["store"].get_client())[-1]
    assert journal.phase == "rolled back"
    # Roles the server lacked were created in the prepare phase (none here); everything else is back.
    files = "untouched" if fault == "redis-out-of-memory" else "put back"  # Redis failed before the files' turn
    assert {t.kind: t.state for t in journal.targets if t.kind != "globals"} == {
        "postgres": "put back", "redis": "put back", "files": files}
    events = [e for e, _ in s["app"].events]
    if fault == "never-healthy":
        assert events == ["on"] and "maintenance mode stays ON" in message
    else:
        assert events == ["on", "off"] and "maintenance mode is OFF" in message
    # The verified copies stay beside, named in the report with the safety copy.
    beside = [d for d in _databases(s["pg"]) if "__restore_" in d]
    assert len(beside) == 4
    report = _artifact("recovery-report")
    assert "FAILED and undone" in report and all(f"`{d}`" in report for d in beside)
    assert journal.redis_safety_copy.key in report


def test_a_staging_dir_that_is_not_there_is_refused_before_anything_changes(production, prefect_harness, tmp_path):
    s = production
    set_id = _backup(s)
    _damage(s)
    before = fingerprint(s)
    journals = len(read_journals(s["store"].get_client()))
    state = _recover(s, set_id, staging_dir=str(tmp_path / "not-there"))
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "staging_dir" in message and "not-there" in message and "nothing was changed" in message
    assert fingerprint(s) == before and s["app"].events == []
    assert len(read_journals(s["store"].get_client())) == journals  # refused before the recovery began


def test_redis_that_refuses_restore_fails_the_prepare_phase_and_changes_nothing(production, prefect_harness):
    s = production
    set_id = _backup(s)
    _damage(s)
    s["redis"].get_client().execute_command("ACL", "SETUSER", "norestore", "on", ">pw-norestore", "~*", "&*", "+@all",
                                            "-restore")
    limited = RedisConnection(host=s["redis"].host, port=s["redis"].port, username="norestore",
                              password=SecretStr("pw-norestore"))
    before = fingerprint(s)

    state = disaster_recovery(store=s["store"], backup_id=set_id, postgres=s["pg"], redis=limited,
                              app=s["endpoint"], confirm=True, return_state=True)

    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "refused to RESTORE" in message and "nothing was changed" in message
    assert fingerprint(s) == before
    assert not [d for d in _databases(s["pg"]) if any(m in d for m in SIDE_MARKS)]  # prepared copies removed
    assert not list(s["media"].parent.glob("media.restore-*"))
    assert s["app"].events == []
    assert read_journals(s["store"].get_client())[-1].phase == "prepare failed"


def test_database_preflight_names_what_the_connection_may_not_do(production):
    s = production
    with s["pg"].connect(autocommit=True) as c:
        c.execute("CREATE ROLE operator LOGIN PASSWORD 'op-pw' CREATEDB")
        c.execute("CREATE DATABASE shop__restore_x OWNER operator")
    operator = s["pg"].model_copy(update={"user": "operator", "password": SecretStr("op-pw")})
    with pytest.raises(PreflightFailed) as caught:
        preflight_swap.fn(operator, [Swap(live="shop", restored="shop__restore_x", kept="shop__pre_x")])
    text = str(caught.value)
    assert "does not own database 'shop'" in text and "pg_signal_backend" in text and "nothing was changed" in text
    assert "op-pw" not in text


def test_restore_set_refuses_a_redis_that_holds_keys(production, prefect_harness):
    s = production
    set_id = _backup(s)
    before = keyspace_digest(s["redis"])
    state = restore_set(store=s["store"], backup_id=set_id, redis=s["redis"], postgres=s["pg"],
                        files_root=str(s["store_path"].parent / "restored"), return_state=True)
    assert state.is_failed()
    assert "holds 2002 keys" in str(state.result(raise_on_failure=False))
    assert keyspace_digest(s["redis"]) == before
    assert not (s["store_path"].parent / "restored").exists()
    assert not [d for d in _databases(s["pg"]) if "__restored_" in d]


_CHILD = """
import json, os, sys
from blocks.app import AppEndpoint
from blocks.postgres import PostgresConnection
from blocks.redis import RedisConnection
from blocks.store import BackupStore
from flows.disaster_recovery import disaster_recovery
from pydantic import SecretStr
p = json.loads(os.environ["DR_TEST_PARAMS"])
disaster_recovery(store=BackupStore.from_url(p["store"]), backup_id=p["set_id"],
                  postgres=PostgresConnection.from_url(p["pg"]), redis=RedisConnection.from_url(p["redis"]),
                  app=AppEndpoint(base_url=p["app"], auth_value=SecretStr(p["auth"])), confirm=True)
"""


def test_a_recovery_killed_mid_commit_is_found_reported_and_undone(production, prefect_harness, capsys):
    from prefect.settings import PREFECT_API_URL

    s = production
    _fill_redis(s["redis"], keys=150_000, size=40)  # a Redis restore that takes a few seconds
    set_id = _backup(s)
    _damage(s)
    before = fingerprint(s)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "DR_TEST_PARAMS": json.dumps({
        "store": f"file://{s['store_path']}", "set_id": set_id, "pg": s["server"].url, "redis": s["redis_server"].url,
        "app": s["endpoint"].base_url, "auth": f"Bearer {TOKEN}"})}
    child = subprocess.Popen([sys.executable, "-c", _CHILD], env=env, cwd=str(Path(__file__).parent.parent),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = s["store"].get_client()
    deadline = time.monotonic() + 240
    try:
        while True:
            assert child.poll() is None, "the recovery ended before it could be killed"
            journals = read_journals(client) if client.list("recoveries/") else []
            if journals and journals[-1].step.startswith("replacing the Redis keyspace"):
                time.sleep(0.3)
                break
            assert time.monotonic() < deadline, journals[-1] if journals else "no journal"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()

    # Nothing is lost: every replaced database is there under its kept name, the Redis safety copy is stored.
    journal = read_journals(client)[-1]
    assert journal.phase == "commit"
    names = _databases(s["pg"])
    for target in (t for t in journal.targets if t.kind == "postgres"):
        assert target.state == "replaced" and target.kept in names
        assert (_database_fingerprint(s["pg"], target.kept)["tables"]
                == before["databases"][target.live]["tables"])
    assert journal.redis_safety_copy.redis.digest == before["redis"]["digest"]
    assert client.exists(journal.redis_safety_copy.key)

    # The next recovery of the same targets refuses, naming the dead one, once the dead run's lock lease has
    # run out (deleting the locks stands in for the 5 minutes that takes).
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as api:
        for limit in api.read_global_concurrency_limits(limit=200):
            if limit.name.startswith("disaster-recovery:"):
                api.delete_global_concurrency_limit_by_name(limit.name)
    state = _recover(s, set_id, lock_timeout_seconds=5)
    assert state.is_failed()
    assert f"runbooks recover-status {journal.recovery_id}" in str(state.result(raise_on_failure=False))

    os.environ["RUNBOOKS_POSTGRES_URL"] = s["server"].url
    os.environ["RUNBOOKS_REDIS_URL"] = s["redis_server"].url
    try:
        capsys.readouterr()
        assert cli_main(["recover-status", journal.recovery_id, "--store", f"file://{s['store_path']}"]) == 0
        status = capsys.readouterr().out
        assert "phase commit" in status and f"'{journal.target('postgres', 'shop').kept}' exists" in status
        assert cli_main(["recover-status", journal.recovery_id, "--store", f"file://{s['store_path']}",
                         "--undo"]) == 0
    finally:
        del os.environ["RUNBOOKS_POSTGRES_URL"], os.environ["RUNBOOKS_REDIS_URL"]
    assert fingerprint(s) == before
    assert read_journal(client, journal.recovery_id).phase == "rolled back"


def test_the_drill_of_a_default_set_restores_every_database_beside_and_passes(production, prefect_harness):
    """`postgres` exists in every drill cluster: it is restored beside, compared, amchecked (names quoted as
    pg_amcheck patterns), with the database properties compared too."""
    from flows.verify import verify_backup
    from tasks.store import read_verification

    s = production
    set_id = _backup(s)
    result = verify_backup(store=s["store"], backup_id=set_id)
    assert result.ok and result.problems == []
    assert set(result.seconds) >= {"postgres:postgres", "postgres:shop", "postgres:icu", f"postgres:{ODD}", "redis"}
    assert read_verification(s["store"].get_client(), set_id).ok


def test_restore_set_keeps_database_properties_and_restores_existing_names_beside(production, prefect_harness,
                                                                                    tmp_path):
    from tasks.scratch import ScratchPostgres
    from tasks.scratch_redis import ScratchRedis

    s = production
    good = fingerprint(s)
    set_id = _backup(s)
    with ScratchPostgres(fast=True) as other, ScratchRedis() as other_redis:
        target = PostgresConnection.from_url(other.url)
        result = restore_set(store=s["store"], backup_id=set_id, postgres=target,
                             redis=RedisConnection.from_url(other_redis.url), files_root=str(tmp_path / "restored"))
        by_name = {p.name: p.target.rsplit("/", 1)[-1] for p in result.parts if p.kind == "postgres"}
        assert by_name["shop"] == "shop" and by_name["postgres"].startswith("postgres__restored_")
        restored = {name: _database_fingerprint(target, name) for name in ("shop", "icu", ODD)}
        restored["postgres"] = _database_fingerprint(target, f"postgres__restored_{set_id[-6:]}")
    assert restored == good["databases"]  # tables, large objects, owner, ACL, settings, comment, encoding


@pytest.mark.parametrize("name", ["with space", 'with "quote"', "with.dot", "star*", "ünïcode ß", "a*b.c \"d\""])
def test_amcheck_checks_exactly_the_database_named(name, production):
    from tasks.postgres import run_amcheck

    s = production
    quoted = name.replace('"', '""')
    with s["pg"].connect(autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{quoted}"')
    with s["pg"].connect(name, autocommit=True) as c:
        c.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 50)")
    result = run_amcheck.fn(s["pg"], name)
    assert result.ok, result.problems
    with s["pg"].connect(name) as c:  # it ran there: --install-missing created the extension in that database
        assert c.execute("SELECT count(*) FROM pg_extension WHERE extname = 'amcheck'").fetchone()[0] == 1
    with s["pg"].connect("shop") as c:
        assert c.execute("SELECT count(*) FROM pg_extension WHERE extname = 'amcheck'").fetchone()[0] == 0


def test_in_place_without_a_safety_copy_drops_the_old_databases_only_after_success(production, prefect_harness):
    s = production
    good = fingerprint(s)
    set_id = _backup(s)
    _damage(s)
    client = s["redis"].get_client()  # first: a run that fails in its commit phase must keep everything
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 600_000)
    state = _recover(s, set_id, mode="in-place", keep_safety_copy=False, health_timeout_seconds=3)
    assert state.is_failed()
    s["redis"].get_client().config_set("maxmemory", 0)
    assert [d for d in _databases(s["pg"]) if "__restore_" in d]  # the verified copies, kept beside
    damaged_names = [d for d in _databases(s["pg"]) if not any(m in d for m in SIDE_MARKS)]
    assert set(damaged_names) == {"postgres", "shop", "icu", ODD}

    state = _recover(s, set_id, mode="in-place", keep_safety_copy=False)
    assert state.is_completed(), state
    assert fingerprint(s) == good
    assert not [d for d in _databases(s["pg"]) if "__pre_restore_" in d]  # dropped, after success only


def test_tables_are_read_back_while_the_restore_runs_and_a_difference_still_fails(fresh_pg, tmp_path, monkeypatch):
    """The parallel restore reads each table back as pg_restore reports it loaded (a table with a primary key
    once that is built too); tables of the same name in two schemas are told apart by the staged dump's table
    of contents. A checksum that differs fails either way."""
    import tasks.pg_readback
    from blocks.errors import VerificationFailed
    from tasks.archive import locking_items, read_head
    from tasks.postgres import dump_database, restore_database
    from tasks.store import stage_part

    pg = PostgresConnection.from_url(fresh_pg.url)
    with pg.connect(autocommit=True) as c:
        c.execute("CREATE DATABASE src")
    with pg.connect("src", autocommit=True) as c:
        c.execute("""
            CREATE SCHEMA other;
            CREATE TABLE public.twin AS SELECT g FROM generate_series(1, 3000) g;
            CREATE TABLE other.twin AS SELECT g * 2 AS g FROM generate_series(1, 3000) g;
            CREATE TABLE "with space" AS SELECT g, md5(g::text) FROM generate_series(1, 200000) g;
            CREATE TABLE small AS SELECT 1 AS one;
            ALTER TABLE "with space" ADD PRIMARY KEY (g);
        """)
    store = BackupStore.from_url(f"file://{tmp_path}/store")
    part = dump_database.fn(pg, "src", store, "20261201T000000Z-abcdef")
    staged = stage_part.fn(part, store, str(tmp_path / "staging"))
    reads: list[tuple[bool, list[str] | None]] = []  # (after the restore ended, patterns)
    restore_ended: list[bool] = []
    real_dump, real_finish = tasks.pg_readback.digest_dump, tasks.pg_readback.ReadBack.finish

    def recording(conn: Any, database: str, patterns: list[str] | None) -> Any:
        reads.append((bool(restore_ended), patterns))
        return real_dump(conn, database, patterns)

    def finishing(self: Any) -> Any:
        restore_ended.append(True)
        return real_finish(self)

    monkeypatch.setattr(tasks.pg_readback, "digest_dump", recording)
    monkeypatch.setattr(tasks.pg_readback.ReadBack, "finish", finishing)
    assert staged.data_offsets == 4  # pg_restore -j seeks to each table's data
    restored = restore_database.fn(part, store, pg, "copy", staged_file=staged.path, jobs=2)
    assert restored.tables == 4
    assert list(restored.steps) == ["create database", "schema (pg_restore --section=pre-data)",
                                    "data and indexes (pg_restore -j2, tables read back beside)",
                                    "database properties", "tables not yet read back, sequences, comparison"]
    beside = [p for ended, batch in reads if not ended for p in batch or []]
    assert beside  # read while pg_restore still ran
    head = read_head(staged.path)
    pkey = [i for i, e in head.entries.items() if e.desc == "CONSTRAINT" and e.tag == "with space with space_pkey"]
    assert locking_items(head) == {("public", "with space"): set(pkey)}  # its primary key locks it: read after
    assert all(batch for _ended, batch in reads)  # never a whole-database dump: each table is read once
    assert sorted(p for _ended, batch in reads for p in batch or []) == sorted(
        ['"other"."twin"', '"public"."twin"', '"public"."with space"', '"public"."small"'])

    bad = part.model_copy(deep=True)
    table = next(t for t in bad.tables if t.table == "with space")
    table.checksum = "xxh64sum:" + format(int(table.checksum.split(":")[1], 16) ^ 1, "016x")
    with pytest.raises(VerificationFailed, match="public.with space: content checksum differs"):
        restore_database.fn(bad, store, pg, "copy2", staged_file=staged.path, jobs=2)
    assert "copy2" not in _databases(pg)


def test_a_database_preflight_refusal_fails_before_any_change(production, prefect_harness):
    """A user that may restore beside (CREATEDB, owner of the database) but not end other sessions: the
    rename pre-flight refuses in phase 1, the prepared copy is removed, production and maintenance untouched."""
    s = production
    with s["pg"].connect(autocommit=True) as c:
        c.execute("CREATE ROLE operator LOGIN PASSWORD 'op-pw' CREATEDB")
        c.execute("CREATE DATABASE plain OWNER operator")
    operator = s["pg"].model_copy(update={"user": "operator", "password": SecretStr("op-pw")})
    with operator.connect("plain", autocommit=True) as c:
        c.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS g")
    set_id = backup(store=s["store"], postgres=operator, databases=["plain"], include_globals=False,
                    retries=0).set_id
    with operator.connect("plain", autocommit=True) as c:
        c.execute("DELETE FROM t WHERE g > 10")
    before = fingerprint(s)

    state = disaster_recovery(store=s["store"], backup_id=set_id, postgres=operator, app=s["endpoint"],
                              confirm=True, return_state=True)

    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "pre-flight" in message and "pg_signal_backend" in message and "nothing was changed" in message
    assert fingerprint(s) == before
    assert not [d for d in _databases(s["pg"]) if any(m in d for m in SIDE_MARKS)]
    assert s["app"].events == []
