"""db-integrity-check against real PostgreSQL 15 clusters with real corruption written into relation files,
with and without data checksums; sessions, slots, sequences, wraparound and stale tables made for real."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from blocks.errors import AmcheckFailed, ConfigurationError
from blocks.postgres import PostgresConnection
from tasks.findings import Check, Finding, Severity
from tasks.integrity import (
    AmcheckOptions,
    Thresholds,
    check_corruption,
    check_invalid_indexes,
    check_replication,
    check_sequences,
    check_sessions,
    check_vacuum,
    check_wraparound,
    list_databases,
)
from tasks.remediation import terminate_sessions, vacuum_table
from tasks.scratch import ScratchPostgres

INDEX_BLOCK, HEAP_BLOCK = 2, 3
GARBAGE_INDEX = b"\xde\xad\xbe\xef" * 200  # inside a leaf page: line pointers and tuples
GARBAGE_HEAP = b"\x5a" * 2000  # tuple headers: xmin/xmax/infomask nonsense


def connect(server: ScratchPostgres, database: str = "postgres", **kwargs: Any) -> psycopg.Connection:
    options = {"autocommit": True, "connect_timeout": 5, **kwargs}
    return psycopg.connect(host=server.host, port=server.port, user="postgres", password=server.password,
                           dbname=database, **options)


def block(server: ScratchPostgres) -> PostgresConnection:
    return PostgresConnection.from_url(server.url)


def create_database(server: ScratchPostgres, name: str, *, rows: int = 20000) -> None:
    """A database with t (id primary key) and u (id primary key, text), ``rows`` rows each."""
    with connect(server) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with connect(server, name) as conn:
        for table, fill in (("t", "x"), ("u", "y")):
            conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(sql.Identifier(table)))
            conn.execute(sql.SQL("INSERT INTO {} SELECT g, repeat(%s, 50) || g FROM generate_series(1, %s) g")
                         .format(sql.Identifier(table)), (fill, rows))


def relation_file(server: ScratchPostgres, database: str, relation: str) -> Path:
    with connect(server, database) as conn:
        return server.data_dir / conn.execute("SELECT pg_relation_filepath(%s)", (relation,)).fetchone()[0]


def corrupt(server: ScratchPostgres, targets: list[tuple[str, str, int, bytes]]) -> None:
    """Stop the cluster, overwrite bytes inside each (database, relation, block) file, start it again."""
    with connect(server) as conn:
        conn.execute("CHECKPOINT")
    files = [(relation_file(server, db, rel), blk, data) for db, rel, blk, data in targets]
    server.shutdown()
    for path, blk, data in files:
        with open(path, "r+b") as fh:
            fh.seek(8192 * blk + (1000 if data is GARBAGE_INDEX else 6000))
            fh.write(data)
    server.start()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def by_check(findings: list[Finding], check: Check) -> list[Finding]:
    return [f for f in findings if f.check == check]


# ------------------------------------------------------------------------------------------- the cluster


def test_scratch_cluster_with_and_without_data_checksums_survives_a_clean_restart() -> None:
    for checksums, expected in ((True, "on"), (False, "off")):
        with ScratchPostgres(fast=True, data_checksums=checksums) as server:
            with connect(server) as conn:
                conn.execute("CREATE TABLE keep (id int)")
                conn.execute("INSERT INTO keep VALUES (42)")
                assert conn.execute("SHOW data_checksums").fetchone() == (expected,)
            server.shutdown()
            assert not server.is_running() and server.data_dir.is_dir()
            server.start()
            with connect(server) as conn:
                assert conn.execute("SELECT id FROM keep").fetchone() == (42,)


# ------------------------------------------------------------------------------------ pg_amcheck patterns


def test_database_names_are_matched_exactly_by_pg_amcheck() -> None:
    """The corrupt database is 'abc'; checking 'a*' must not check it (an unquoted a* would); 'Sales.EU' must
    not be read as database 'Sales' schema 'EU'; quotes, spaces and non-ASCII reach the right database."""
    names = ["abc", "a*", "Sales.EU", "sales", 'we"ird', "my db", "bücher"]
    with ScratchPostgres(fast=True, data_checksums=False) as server:
        for name in names:
            create_database(server, name, rows=2000)
        corrupt(server, [("abc", "t_pkey", 1, GARBAGE_INDEX), ("sales", "t_pkey", 1, GARBAGE_INDEX)])
        pg = block(server)
        assert set(names) <= set(list_databases.fn(pg))
        run = check_corruption.fn(pg, ["a*", "Sales.EU", 'we"ird', "my db", "bücher"], install_amcheck=True)
        assert run.findings == [] and run.clean_databases == ["a*", "Sales.EU", 'we"ird', "my db", "bücher"]
        run = check_corruption.fn(pg, ["abc"], install_amcheck=True)
        assert [(f.database, f.object, f.severity, f.kind, f.schema_name, f.relation, f.parent) for f in run.findings] \
            == [("abc", "public.t_pkey", Severity.critical, "index", "public", "t_pkey", "public.t")]
        run = check_corruption.fn(pg, ["Sales.EU", "sales"], install_amcheck=True)
        assert [(f.database, f.object) for f in run.findings] == [("sales", "public.t_pkey")]
        for name in names:  # every database got the extension, each exactly once
            with connect(server, name) as conn:
                assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'amcheck'").fetchone() == (1,)


def test_without_the_extension_and_without_permission_the_database_is_reported_not_checked() -> None:
    with ScratchPostgres(fast=True) as server:
        create_database(server, "app", rows=100)
        run = check_corruption.fn(block(server), ["app"], install_amcheck=False)
        assert [(f.database, f.severity, f.kind) for f in run.findings] == [("app", Severity.warning, "not checked")]
        assert run.databases == [] and run.unchecked == ["app"]
        with connect(server, "app") as conn:
            assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'amcheck'").fetchone() == (0,)
        with pytest.raises(AmcheckFailed, match='no connectable databases to check matching ""gone""') as failed:
            check_corruption.fn(block(server), ["gone"], install_amcheck=True)  # cannot check is not "clean"
        assert server.password not in str(failed.value)
        with pytest.raises(ConfigurationError, match=r"\['gone'\] do not exist"):
            list_databases.fn(block(server), ["app", "gone"])


# ------------------------------------------------------------------------------- real corruption, the flow


@pytest.fixture(params=[True, False], ids=["checksums", "no-checksums"])
def corrupted(request: pytest.FixtureRequest) -> Iterator[tuple[ScratchPostgres, bool]]:
    """A cluster whose database 'idx' has a damaged index (t_pkey) and 'heap' a damaged table (u)."""
    with ScratchPostgres(fast=True, data_checksums=request.param) as server:
        create_database(server, "idx")
        create_database(server, "heap")
        with connect(server, "heap") as conn:  # u is stale too: many dead rows, far from the damaged block
            conn.execute("ALTER TABLE u SET (autovacuum_enabled = false)")
            conn.execute("DELETE FROM u WHERE id > 15000")
        corrupt(server, [("idx", "t_pkey", INDEX_BLOCK, GARBAGE_INDEX), ("heap", "u", HEAP_BLOCK, GARBAGE_HEAP)])
        yield server, request.param


def _run(**params: Any) -> tuple[Any, Any]:
    """Run the flow; (final state, report) whether it passed or failed."""
    from flows.integrity import db_integrity_check

    state = db_integrity_check(**params, return_state=True)
    result = state.result(raise_on_failure=False)
    return state, getattr(result, "report", result)


def test_index_corruption_is_critical_and_reindex_rebuilds_it(prefect_harness: None,
                                                              corrupted: tuple[ScratchPostgres, bool]) -> None:
    server, checksums = corrupted
    pg = block(server)
    state, report = _run(postgres=pg, databases=["idx"], install_amcheck=True)
    assert state.is_failed()
    [index] = by_check(report.findings, Check.amcheck)
    assert (index.severity, index.kind, index.object) == (Severity.critical, "index", "public.t_pkey")
    assert report.remediations == []  # no switch, no change
    with connect(server, "idx") as conn:
        filenode = conn.execute("SELECT relfilenode FROM pg_class WHERE relname = 't_pkey'").fetchone()
    if checksums:
        [failures] = by_check([f for f in report.findings if f.kind == "failures"], Check.checksums)
        assert failures.severity == Severity.critical and failures.database == "idx"

    state, report = _run(postgres=pg, databases=["idx"], install_amcheck=True, reindex=True)
    assert state.is_completed(), state.message
    [done] = report.remediations
    assert done.action == "REINDEX INDEX CONCURRENTLY" and done.ok, done
    assert done.after.startswith("valid") and done.after.endswith("amcheck: ok")
    assert [f.object for f in report.resolved] == ["public.t_pkey"]
    with connect(server, "idx") as conn:
        assert conn.execute("SELECT relfilenode FROM pg_class WHERE relname = 't_pkey'").fetchone() != filenode
        conn.execute("SET enable_seqscan = off")
        assert conn.execute("SELECT count(*), sum(id) FROM t WHERE id > 0").fetchone() == (20000, 20000 * 20001 // 2)

    state, report = _run(postgres=pg, databases=["idx"], install_amcheck=True)
    assert state.is_completed()
    assert by_check(report.findings, Check.amcheck) == []
    assert [f for f in report.findings if f.severity == Severity.critical] == []
    if checksums:  # the counter stays; amcheck proves the damage gone, so it is a warning that says so
        [failures] = [f for f in report.findings if f.kind == "failures"]
        assert failures.severity == Severity.warning and "intact now" in failures.detail


def test_heap_corruption_is_critical_and_never_fixed(prefect_harness: None, corrupted: tuple[ScratchPostgres, bool],
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    from blocks.store import BackupStore
    from flows.backup import backup
    from tasks.manifest import Verification
    from tasks.remediation import recovery_options
    from tasks.store import record_verification

    server, _checksums = corrupted
    pg = block(server)
    store = BackupStore(path=str(tmp_path_factory.mktemp("integrity-store")))
    made = backup(store=store, postgres=pg, databases=["idx"], include_globals=False)
    heap_file = relation_file(server, "heap", "u")
    damaged = file_digest(heap_file)

    stale = Thresholds(stale_min_dead_tuples=1000, stale_days=0)
    state, report = _run(postgres=pg, databases=["heap"], install_amcheck=True, reindex=True,
                         vacuum_stale_tables=True, store=store, thresholds=stale)
    assert state.is_failed() and "critical" in state.message
    [heap] = [f for f in report.findings if f.check == Check.amcheck]
    assert (heap.severity, heap.kind, heap.object) == (Severity.critical, "heap", "public.u")
    assert "do NOT reindex" in heap.action
    assert [f.object for f in report.findings if f.check == Check.vacuum] == ["public.u"]
    assert report.remediations == []  # nothing was "fixed": no reindex of u_pkey, no vacuum of u
    assert made.set_id in report.recovery and "NOT verified" in report.recovery
    assert "no base backup" in report.recovery
    record_verification.fn(store, Verification(set_id=made.set_id, verified_at=datetime.now(UTC), ok=True))
    assert f"`{made.set_id}`" in recovery_options.fn(store, [heap])
    assert "verified by a restore drill at" in recovery_options.fn(store, [heap])
    assert file_digest(heap_file) == damaged
    with connect(server, "heap") as conn:
        assert conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 'u_pkey'::regclass").fetchone() \
            == (True,)


def test_invalid_index_from_a_failed_concurrent_unique_build(prefect_harness: None) -> None:
    with ScratchPostgres(fast=True) as server:
        create_database(server, "app", rows=1000)
        with connect(server, "app") as conn:
            conn.execute("INSERT INTO u VALUES (1001, 'dup'), (1002, 'dup')")
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute("CREATE UNIQUE INDEX CONCURRENTLY u_v_key ON u (v)")
        pg = block(server)
        [invalid] = check_invalid_indexes.fn(pg, ["app"])
        assert (invalid.object, invalid.kind, invalid.severity) == ("public.u_v_key", "invalid", Severity.warning)
        assert "uniqueness is not enforced" in invalid.detail

        # Asked to rebuild while the duplicates are still there: the reindex fails and leaves nothing behind.
        state, report = _run(postgres=pg, databases=["app"], install_amcheck=True, reindex=True)
        [done] = report.remediations
        assert not done.ok and "duplicate" in done.error and done.after.startswith("INVALID")
        with connect(server, "app") as conn:
            names = [r[0] for r in conn.execute("SELECT relname FROM pg_class WHERE relname LIKE 'u_v_key%'")]
        assert names == ["u_v_key"]
        assert [f.object for f in report.findings if f.check == Check.invalid_indexes] == ["public.u_v_key"]
        assert state.is_completed()  # a warning stays open; the default fail_on is critical
        state, _report = _run(postgres=pg, databases=["app"], checks=["invalid_indexes"], fail_on="warning")
        assert state.is_failed() and "public.u_v_key" in state.message

        with connect(server, "app") as conn:
            conn.execute("DELETE FROM u WHERE id = 1002")
        state, report = _run(postgres=pg, databases=["app"], install_amcheck=True, reindex=True)
        [done] = report.remediations
        assert done.ok and done.before.startswith("INVALID") and done.after.startswith("valid"), done
        assert check_invalid_indexes.fn(pg, ["app"]) == []
        with connect(server, "app") as conn, pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO u VALUES (2000, 'dup')")


# ------------------------------------------------------------------------------------------ sessions


def _alive(server: ScratchPostgres, pid: int) -> bool:
    with connect(server) as conn:
        return conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() is not None


def test_idle_in_transaction_is_reported_and_terminated_only_with_the_switch(prefect_harness: None) -> None:
    with ScratchPostgres(fast=True) as server:
        create_database(server, "app", rows=10)
        sessions = {}
        for app in ("webapp", "runbooks", "batch"):
            conn = connect(server, "app", application_name=app, autocommit=False)
            conn.execute("SELECT * FROM t LIMIT 1")  # a transaction left open
            sessions[app] = conn
        late = connect(server, "app", application_name="late", autocommit=False)
        late.execute("SELECT 1")  # idle in transaction when checked, committed before the termination
        idle = connect(server, "app", application_name="pool")
        walsender = connect(server, "app", application_name="replica", replication="database")
        walsender_pid = walsender.info.backend_pid
        pids = {app: conn.info.backend_pid for app, conn in sessions.items()}
        time.sleep(1.5)
        t = Thresholds(idle_in_transaction_minutes=0.01, idle_session_minutes=0.01)
        pg = block(server)
        try:
            found = check_sessions.fn(pg, ["app"], t)
            assert sorted((f.kind, f.pid) for f in found) == sorted([
                ("idle in transaction", pids["webapp"]), ("idle in transaction", pids["batch"]),
                ("idle in transaction", late.info.backend_pid), ("idle", idle.info.backend_pid)])
            late.commit()  # now merely idle (and younger than the threshold): the termination re-checks
            [left] = terminate_sessions.fn(pg, [f for f in found if f.pid == late.info.backend_pid],
                                           states=["idle in transaction"], min_seconds=0.6, exclude_applications=[])
            assert left.ok and left.after.startswith("left alone") and _alive(server, late.info.backend_pid)
            late.close()
            state, report = _run(postgres=pg, databases=["app"], checks=["sessions"], thresholds=t)
            assert state.is_completed() and report.remediations == []
            assert all(_alive(server, pid) for pid in [*pids.values(), idle.info.backend_pid])

            state, report = _run(postgres=pg, databases=["app"], checks=["sessions"], thresholds=t,
                                 terminate_idle_in_transaction=True, terminate_idle_sessions=True,
                                 exclude_applications=["batch"])
            ended = {r.object.split()[1] for r in report.remediations if r.after == "session ended"}
            assert ended == {str(pids["webapp"]), str(idle.info.backend_pid)}
            assert not _alive(server, pids["webapp"]) and not _alive(server, idle.info.backend_pid)
            assert _alive(server, pids["runbooks"]) and _alive(server, pids["batch"]) and _alive(server, walsender_pid)
            assert sessions["runbooks"].execute("SELECT 1").fetchone() == (1,)  # its transaction still works
            with pytest.raises(psycopg.OperationalError):
                sessions["webapp"].execute("SELECT 1")
            assert [f.pid for f in report.findings if f.check == Check.sessions] == [pids["batch"]]
        finally:
            for conn in [*sessions.values(), late, idle, walsender]:
                conn.close()


# ----------------------------------------------------------------- wraparound, sequences, slots, vacuum


def test_wraparound_and_sequence_thresholds_trip() -> None:
    with ScratchPostgres(fast=True) as server:
        create_database(server, "app", rows=10)
        with connect(server, "app") as conn:
            for _ in range(20):
                conn.execute("SELECT txid_current()")  # burn transaction IDs
            conn.execute("CREATE SEQUENCE small AS smallint")
            conn.execute("SELECT setval('small', 30000)")  # 91.5 % of 32767: critical
            conn.execute("CREATE TABLE w (id integer)")
            conn.execute("CREATE SEQUENCE w_id_seq AS bigint OWNED BY w.id")
            conn.execute("SELECT setval('w_id_seq', 1700000000)")  # 79 % of the integer column: warning
            conn.execute("CREATE SEQUENCE roomy AS bigint")
            conn.execute("SELECT setval('roomy', 1700000000)")  # nothing for a bigint
            conn.execute("CREATE SEQUENCE down INCREMENT -1 MINVALUE -100 MAXVALUE -1 START -1")
            conn.execute("SELECT setval('down', -95)")  # descending, 95 % used
        pg = block(server)
        assert check_wraparound.fn(pg, ["app"], Thresholds()) == []
        found = check_wraparound.fn(pg, ["app"], Thresholds(xid_age_warning=5, xid_age_critical=10**9,
                                                            table_findings_per_database=1000))
        kinds = {(f.kind, f.severity) for f in found}
        assert ("database transaction ID", Severity.warning) in kinds
        assert any(f.kind == "table transaction ID" and f.object == "public.t" for f in found)
        assert not any("multixact" in f.kind for f in found)
        sharers = [connect(server, "app", autocommit=False) for _ in range(2)]
        for conn in sharers:  # two lockers of one row: a multixact
            conn.execute("SELECT * FROM t WHERE id = 1 FOR SHARE")
        for conn in sharers:
            conn.commit()
            conn.close()
        found = check_wraparound.fn(pg, ["app"], Thresholds(mxid_age_warning=1, mxid_age_critical=2**31))
        assert ("database multixact", Severity.warning) in {(f.kind, f.severity) for f in found}

        seqs = {f.object: f for f in check_sequences.fn(pg, ["app"], Thresholds())}
        assert set(seqs) == {"public.small", "public.w_id_seq", "public.down"}
        assert seqs["public.small"].severity == Severity.critical and "2,767 calls left" in seqs["public.small"].detail
        assert seqs["public.w_id_seq"].severity == Severity.warning
        assert "integer column public.w.id" in seqs["public.w_id_seq"].detail
        assert seqs["public.down"].severity == Severity.critical and "5 calls left" in seqs["public.down"].detail


def test_inactive_slot_holding_wal_and_failing_archiver_are_reported() -> None:
    settings = {"archive_mode": "on", "archive_command": "false", "archive_timeout": "0"}
    with ScratchPostgres(fast=True, settings=settings) as server:
        pg = block(server)
        with connect(server) as conn:
            conn.execute("SELECT pg_create_physical_replication_slot('stale', true)")
            conn.execute("CREATE TABLE filler AS SELECT g, repeat('z', 200) AS v FROM generate_series(1, 20000) g")
            conn.execute("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = check_replication.fn(pg, Thresholds(slot_retained_wal_warning_bytes=1 << 20))
            if any(f.object == "WAL archiver" for f in found):
                break
            time.sleep(0.5)
        slots = {f.object: f for f in found}
        assert slots["slot stale"].severity == Severity.warning and "INACTIVE" in slots["slot stale"].detail
        assert slots["WAL archiver"].severity == Severity.critical and "failing" in slots["WAL archiver"].detail
        critical = check_replication.fn(pg, Thresholds(slot_retained_wal_critical_bytes=1 << 20))
        assert {f.object: f.severity for f in critical}["slot stale"] == Severity.critical


def test_stale_table_is_reported_and_vacuumed_with_the_switch(prefect_harness: None) -> None:
    with ScratchPostgres(fast=True) as server:
        create_database(server, "app", rows=20000)
        with connect(server, "app") as conn:
            conn.execute("ALTER TABLE u SET (autovacuum_enabled = false)")
            conn.execute("DELETE FROM u WHERE id > 5000")
        pg = block(server)
        t = Thresholds(stale_min_dead_tuples=1000, stale_days=0)
        deadline = time.monotonic() + 15  # the deleting session's statistics reach the view when it ends
        while not (found := check_vacuum.fn(pg, ["app"], t)) and time.monotonic() < deadline:
            time.sleep(0.2)
        [stale] = found
        assert stale.object == "public.u" and "15,000 dead tuples" in stale.detail and "vacuumed never" in stale.detail
        state, report = _run(postgres=pg, databases=["app"], checks=["vacuum"], thresholds=t, vacuum_stale_tables=True)
        [done] = report.remediations
        assert done.ok and done.before.startswith("15000 dead") and done.after.startswith("0 dead"), done
        assert report.findings == [] and state.is_completed()
        gone = stale.model_copy(update={"relation": "dropped_meanwhile", "object": "public.dropped_meanwhile"})
        failed = vacuum_table.fn(pg, gone)
        assert not failed.ok and failed.before == "absent" and "does not exist" in failed.error


# ------------------------------------------------------------------------------------ a healthy cluster


def test_healthy_cluster_has_nothing_above_info(prefect_harness: None, pushgateway: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    from prefect.client.orchestration import get_client

    monkeypatch.setenv("RUNBOOKS_PUSHGATEWAY_URL", pushgateway.url)
    with ScratchPostgres(fast=True, password=secrets.token_urlsafe(12)) as server:
        create_database(server, "app", rows=5000)
        with connect(server, "app") as conn:
            conn.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, customer int, note text)")
            conn.execute("CREATE INDEX orders_customer ON orders (customer)")
            conn.execute("INSERT INTO orders (customer, note) "
                         "SELECT g % 100, md5(g::text) FROM generate_series(1, 5000) g")
        state, report = _run(postgres=block(server), install_amcheck=True,
                             amcheck=AmcheckOptions(heapallindexed=True, parent_check=True, toast=True))
        assert state.is_completed(), state.message
        assert set(report.databases) == {"app", "postgres"}
        assert [f for f in report.findings if f.severity.rank > Severity.info.rank] == []
        assert report.counts["warning"] == 0 and report.counts["critical"] == 0
        with get_client(sync_client=True) as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        kinds = {a.key: a for a in artifacts}
        assert kinds["integrity-report"].data.startswith("# db-integrity-check: PASSED")
        assert server.password not in str([a.data for a in artifacts])
        with urllib.request.urlopen(f"{pushgateway.url}/metrics", timeout=5) as response:  # noqa: S310
            metrics = response.read().decode()
        assert 'runbooks_integrity_findings{instance="",job="runbooks",runbook="db-integrity-check",' \
               'severity="critical"} 0' in metrics
