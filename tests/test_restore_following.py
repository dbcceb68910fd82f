"""A restore that follows its download (tasks/pg_load.py) and the block-range read-back (tasks/pg_readback.py),
against a real PostgreSQL: the data loads while the dump still arrives, each table's own indexes and
constraints come right after it, and the result is the same database as a plain ``pg_restore`` makes, with the
same checksums; a download that fails or starts over, or a loader that fails, leaves no database behind."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

import tasks.pg_checksums
import tasks.pg_load
import tasks.pg_readback
from blocks.backends import LocalStore
from blocks.errors import ConnectionFailed, DumpFailed, RestoreFailed
from blocks.postgres import PostgresConnection
from blocks.store import BackupStore
from tasks.archive import parse_head, read_head, with_copy_statements
from tasks.manifest import Part
from tasks.pg_checksums import collect_checksums, digest_database
from tasks.pg_load import frozen_copies, table_items
from tasks.pg_readback import ReadBack
from tasks.postgres import dump_database, restore_database
from tasks.process import child_env, pg_tool
from tasks.scratch import ScratchPostgres
from tasks.staging import StagingProgress, StagingRestarted
from tasks.store import stage_part

SCHEMA = 'we "ird".schema é'


@pytest.fixture(scope="module")
def source(pg: ScratchPostgres) -> PostgresConnection:
    """Tables of every kind a loader meets: a big one with a primary key and an index, a unique constraint, a
    foreign key, a partitioned table, generated and dropped columns, awkward text and names, a large object,
    an empty table, many small tables (loaded several to one pg_restore)."""
    conn_info = PostgresConnection.from_url(pg.url)
    with conn_info.connect(autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS follow_src")
        admin.execute("CREATE DATABASE follow_src")
    q = SCHEMA.replace('"', '""')
    with conn_info.connect("follow_src", autocommit=True) as c:
        c.execute(f"""
            CREATE SCHEMA "{q}";
            CREATE TABLE "{q}"."big.table" (id int PRIMARY KEY, note text, doc jsonb, raw bytea, at timestamptz,
                                            n numeric, twice int GENERATED ALWAYS AS (id * 2) STORED, gone int);
            ALTER TABLE "{q}"."big.table" DROP COLUMN gone;
            INSERT INTO "{q}"."big.table" (id, note, doc, raw, at, n)
                SELECT i, CASE WHEN i % 9 = 0 THEN NULL ELSE E'tab\\there\\nline \\\\ ' || i END,
                       jsonb_build_object('i', i, 'ü', repeat('x', i % 50)), decode(md5(i::text), 'hex'),
                       '2026-01-01 00:00:00+02'::timestamptz + i * interval '1 second', i / 7.0
                FROM generate_series(1, 120000) i;
            CREATE INDEX big_note ON "{q}"."big.table" (note);
            CREATE TABLE customers (id int PRIMARY KEY, email text UNIQUE);
            INSERT INTO customers SELECT i, 'c' || i || '@example.org' FROM generate_series(1, 3000) i;
            CREATE TABLE orders (id bigserial PRIMARY KEY, customer int REFERENCES customers, total numeric(10,2));
            INSERT INTO orders (customer, total) SELECT 1 + i % 3000, i / 4.0 FROM generate_series(1, 20000) i;
            CREATE TABLE events (at date NOT NULL, what text) PARTITION BY RANGE (at);
            CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
            CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
            CREATE INDEX events_what ON events (what);
            INSERT INTO events SELECT date '2025-06-01' + (i % 400), 'e' || i FROM generate_series(1, 5000) i;
            CREATE TABLE empty_one (a int PRIMARY KEY);
            SELECT lo_from_bytea(0, 'a large object, in a data block of its own kind');
        """)
        for i in range(30):
            c.execute(f"CREATE TABLE small_{i} (k int PRIMARY KEY, v text)")
            c.execute(f"INSERT INTO small_{i} SELECT g, 'v' || g FROM generate_series(1, {10 + i}) g")
    return conn_info.model_copy(update={"database": "follow_src"})


@pytest.fixture(scope="module")
def backed_up(source: PostgresConnection, tmp_path_factory: pytest.TempPathFactory) -> tuple[BackupStore, Part]:
    store = BackupStore(backend="local", path=str(tmp_path_factory.mktemp("follow") / "store"))
    return store, dump_database.fn(source, source.database, store, "20261201T000000Z-f011ow")


def _schema(pg: PostgresConnection, database: str) -> str:
    """The database's schema as pg_dump writes it (indexes, constraints, partitions, ownership), without the
    random key of its ``\\restrict`` lines."""
    text = subprocess.run([pg_tool("pg_dump"), "--schema-only", "--no-password"], capture_output=True, check=True,
                          env=child_env(pg.libpq_env(database))).stdout.decode()
    return "\n".join(line for line in text.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


def _content(pg: PostgresConnection, database: str) -> Any:
    with pg.connect(database) as conn:
        tables = collect_checksums(conn)
        objects = conn.execute("SELECT lo_get(oid) FROM pg_largeobject_metadata ORDER BY 1").fetchall()
    return tables, objects


@contextmanager
def _slow_store(monkeypatch: pytest.MonkeyPatch, delay: float = 0.002) -> Iterator[None]:
    """Local store reads that come in 64 KiB pieces, ``delay`` apart: a download slower than the restore."""
    real = LocalStore.open_read

    class Slow:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def read(self, size: int = -1) -> bytes:
            time.sleep(delay)
            return self.handle.read(min(size, 65536) if size > 0 else 65536)

    @contextmanager
    def slow_open(self: Any, key: str) -> Iterator[Any]:
        with real(self, key) as handle:
            yield Slow(handle)

    monkeypatch.setattr(LocalStore, "open_read", slow_open)
    yield


def _stage_in_background(part: Part, store: BackupStore, staging: str,
                         progress: StagingProgress) -> threading.Thread:
    def stage() -> None:
        try:
            stage_part.fn(part, store, staging, progress=progress)
        except Exception:  # noqa: BLE001 - the progress carries it to the restore
            pass

    thread = threading.Thread(target=stage, daemon=True)
    thread.start()
    return thread


def test_a_restore_that_follows_its_download_gives_the_same_database(
    source: PostgresConnection, backed_up: tuple[BackupStore, Part], fresh_pg: ScratchPostgres, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, part = backed_up
    target = PostgresConnection.from_url(fresh_pg.url)
    monkeypatch.setattr(ReadBack, "_SPLIT_BYTES", 4 * 1024 * 1024)  # the big table is read in block ranges
    loads: list[tuple[str, list[int], bool]] = []  # (kind, items, the download still under way)
    real_run = tasks.pg_load.DataLoaders._run

    def recording(self: Any, index: int, options: list[str], ids: list[int], feed: Any) -> None:
        loads.append((options[0], ids, not self.progress.ended))
        real_run(self, index, options, ids, feed)

    monkeypatch.setattr(tasks.pg_load.DataLoaders, "_run", recording)
    ranges: list[str] = []
    real_copy = tasks.pg_readback.digest_copy
    monkeypatch.setattr(tasks.pg_readback, "digest_copy",
                        lambda pg, db, statement: ranges.append(statement) or real_copy(pg, db, statement))
    progress = StagingProgress()
    with _slow_store(monkeypatch, delay=0.02):  # about 2 s for the whole dump
        stager = _stage_in_background(part, store, str(tmp_path / "staging"), progress)
        restored = restore_database.fn(part, store, target, "followed", jobs=2, staging=progress)
    stager.join()

    assert list(restored.steps) == [
        "create database", "schema (pg_restore --section=pre-data)",
        "data, then each table's indexes and constraints (2 loaders following the download; tables read back "
        "beside)", "foreign keys and the rest (pg_restore -j2; tables read back beside)", "database properties",
        "tables not yet read back, sequences, comparison"]
    data_loads = [(ids, under_way) for kind, ids, under_way in loads if kind == "--section=data"]
    assert data_loads[0][1]  # the first block loaded while the dump still downloaded
    head = read_head(progress.staged.path)  # type: ignore[union-attr]
    early = [i for kind, ids, _ in loads if kind == "--section=post-data" for i in ids]
    assert early and {head.entries[i].desc for i in early} <= {"INDEX", "CONSTRAINT"}
    assert not any(head.entries[i].desc == "FK CONSTRAINT" for i in early)  # those wait for every table's data
    assert len(ranges) == 2 and all("big.table" in s for s in ranges)

    assert _content(target, "followed") == _content(source, source.database)
    assert _schema(target, "followed") == _schema(source, source.database)
    # Every table a loader filled went in with COPY FREEZE: each of its pages is all-frozen (and so all-visible).
    with target.connect("followed", autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pg_visibility")
        pages = conn.execute(
            "SELECT c.oid::regclass::text, v.all_frozen, pg_relation_size(c.oid) / current_setting('block_size')::int "
            "FROM pg_class c, pg_visibility_map_summary(c.oid) v "
            "WHERE c.relkind = 'r' AND c.relnamespace::regnamespace::text NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
    assert len(pages) == 36 and sum(size for _, _, size in pages) > 1000
    assert [(table, frozen) for table, frozen, size in pages if frozen != size] == []


def test_table_items_are_a_tables_own_indexes_and_constraints(backed_up: tuple[BackupStore, Part],
                                                              tmp_path: Path) -> None:
    store, part = backed_up
    staged = stage_part.fn(part, store, str(tmp_path / "staging"))
    head = read_head(staged.path)
    items = table_items(head)
    by_table = {head.entries[data].tag: sorted(head.entries[i].tag or "" for i in ids) for data, ids in items.items()}
    assert by_table["big.table"] == ["big.table big.table_pkey", "big_note"]
    assert by_table["customers"] == ["customers customers_email_key", "customers customers_pkey"]
    assert by_table["orders"] == ["orders orders_pkey"]
    assert "events" not in by_table  # a partitioned table has no data of its own
    assert all(head.entries[ids[0]].desc == "CONSTRAINT" for ids in items.values()
               if any(head.entries[i].desc == "CONSTRAINT" for i in ids))  # constraints first: they unblock reads
    assert not any(head.entries[i].desc == "FK CONSTRAINT" for ids in items.values() for i in ids)


def test_block_ranges_read_the_same_checksums_as_pg_dump_and_a_difference_is_read_again(
    source: PostgresConnection, backed_up: tuple[BackupStore, Part], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _store, part = backed_up
    expected = sorted(part.tables, key=lambda t: (t.schema_name, t.table))
    monkeypatch.setattr(ReadBack, "_SPLIT_BYTES", 64 * 1024)  # every table of 8 pages or more is split
    dumped: list[list[str] | None] = []
    real_dump = tasks.pg_readback.digest_dump
    monkeypatch.setattr(tasks.pg_readback, "digest_dump",
                        lambda pg, db, patterns: dumped.append(patterns) or real_dump(pg, db, patterns))

    readback = ReadBack(source, source.database, 3, expected=part.tables)
    assert readback.finish() == expected
    split = [p for batch in dumped for p in batch or []]
    assert f'"{SCHEMA.replace(chr(34), 2 * chr(34))}"."big.table"' not in split  # read in ranges, and they agreed
    assert digest_database(source, source.database) == expected

    dumped.clear()
    real_copy = tasks.pg_readback.digest_copy
    monkeypatch.setattr(tasks.pg_readback, "digest_copy",
                        lambda pg, db, statement: (lambda rows, total: (rows, total + 1))(
                            *real_copy(pg, db, statement)))
    with caplog.at_level(logging.WARNING):
        readback = ReadBack(source, source.database, 2, expected=part.tables)
        assert readback.finish() == expected  # pg_dump's reading is the one compared
    assert "differs from the backup; reading it again with pg_dump" in caplog.text
    assert any('"big.table"' in p for batch in dumped for p in batch or [])


def test_a_download_that_fails_or_starts_over_leaves_no_database(
    backed_up: tuple[BackupStore, Part], fresh_pg: ScratchPostgres, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, part = backed_up
    target = PostgresConnection.from_url(fresh_pg.url)
    corrupt = part.model_copy(update={"sha256": "0" * 64})  # the stored bytes no longer match: found at the end
    progress = StagingProgress()
    with _slow_store(monkeypatch, delay=0.001):
        stager = _stage_in_background(corrupt, store, str(tmp_path / "a"), progress)
        with pytest.raises(StagingRestarted, match="failed: .*sha256"):
            restore_database.fn(corrupt, store, target, "never_a", jobs=2, staging=progress)
    stager.join()

    # A transient failure half way, and the retry half a second later (as the task's retries do).
    progress = StagingProgress()
    real_open = LocalStore.open_read
    opened: list[int] = []

    @contextmanager
    def failing_once(self: Any, key: str) -> Iterator[Any]:
        opened.append(1)
        with real_open(self, key) as handle:
            if len(opened) > 1:
                yield handle
                return

            class Breaking:
                reads = 0

                def read(self, size: int = -1) -> bytes:
                    Breaking.reads += 1
                    time.sleep(0.01)
                    if Breaking.reads > 40:
                        raise ConnectionResetError("connection reset by the store")
                    return handle.read(65536)

            yield Breaking()

    monkeypatch.setattr(LocalStore, "open_read", failing_once)

    def stage_with_a_retry() -> None:
        try:
            stage_part.fn(part, store, str(tmp_path / "b"), progress=progress)
        except ConnectionResetError:
            time.sleep(0.5)
            stage_part.fn(part, store, str(tmp_path / "b"), progress=progress)

    stager = threading.Thread(target=stage_with_a_retry, daemon=True)
    stager.start()
    with pytest.raises(StagingRestarted, match="failed: connection reset|started over"):
        restore_database.fn(part, store, target, "never_b", jobs=2, staging=progress)
    stager.join()
    assert len(opened) == 2 and progress.staged is not None  # the retry itself went through
    with target.connect() as conn:
        names = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
    assert not names & {"never_a", "never_b"}


def test_a_loader_that_fails_stops_the_others_and_leaves_no_database(
    backed_up: tuple[BackupStore, Part], fresh_pg: ScratchPostgres, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, part = backed_up
    target = PostgresConnection.from_url(fresh_pg.url)
    real_spawn = tasks.pg_load.spawn
    calls: list[list[str]] = []

    def third_fails(argv: list[str], **kwargs: Any) -> Any:
        calls.append(argv)
        if len(calls) == 2:  # this pg_restore is told a database that does not exist
            argv = [a.replace("followed_bad", "no_such_db") if a.startswith("--dbname=") else a for a in argv]
        return real_spawn(argv, **kwargs)

    monkeypatch.setattr(tasks.pg_load, "spawn", third_fails)
    progress = StagingProgress()
    with _slow_store(monkeypatch, delay=0.005):  # blocks come one by one: several loads
        stager = _stage_in_background(part, store, str(tmp_path / "staging"), progress)
        with pytest.raises(RestoreFailed, match=r"pg_restore of archive items \[.*\] into .* failed"):
            restore_database.fn(part, store, target, "followed_bad", jobs=2, staging=progress)
    stager.join()
    assert len(calls) >= 2
    with target.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'followed_bad'").fetchone()[0] == 0


def test_copy_statements_are_replaced_in_the_table_of_contents_and_freeze_only_what_may_be_truncated(
    source: PostgresConnection, backed_up: tuple[BackupStore, Part], fresh_pg: ScratchPostgres, tmp_path: Path,
) -> None:
    store, part = backed_up
    staged = stage_part.fn(part, store, str(tmp_path / "staging"))
    head = read_head(staged.path)
    head_bytes = Path(staged.path).read_bytes()[:head.data_start]
    big = next(e for e in head.entries.values() if e.desc == "TABLE DATA" and e.tag == "big.table")
    quoted = '"we ""ird"".schema é"."big.table"'
    assert big.copy_stmt == f"COPY {quoted} (id, note, doc, raw, at, n) FROM stdin;\n"

    # A copy of the database, then a role that may insert into every table but truncate only some.
    target = PostgresConnection.from_url(fresh_pg.url)
    restore_database.fn(part, store, target, "frozen_src", jobs=1)
    with target.connect("frozen_src", autocommit=True) as conn:
        conn.execute("CREATE ROLE loader LOGIN PASSWORD 'loader-pw'")
        conn.execute("GRANT USAGE ON SCHEMA public TO loader")  # not on the other schema: its names stay unseen
        conn.execute("GRANT INSERT ON ALL TABLES IN SCHEMA public TO loader")
        conn.execute("GRANT TRUNCATE ON customers, orders, events_2025, events_2026 TO loader")
    as_owner = frozen_copies(target, "frozen_src", head)
    as_loader = frozen_copies(target.model_copy(update={"user": "loader", "password": SecretStr("loader-pw")}),
                              "frozen_src", head)

    tables = {e.dump_id: e.tag for e in head.entries.values() if e.desc == "TABLE DATA"}
    assert sorted(tables[i] for i in as_owner) == sorted(tables.values())  # every table has its own data here
    assert sorted(tables[i] for i in as_loader) == ["customers", "events_2025", "events_2026", "orders"]
    assert as_owner[big.dump_id] == (f"TRUNCATE ONLY {quoted}; COPY {quoted} (id, note, doc, raw, at, n) "
                                     "FROM stdin WITH (FREEZE);\n")

    # A dump made with --load-via-partition-root loads each partition through its root, which is never frozen.
    entry = next(e for e in head.entries.values() if e.tag == "events_2025" and e.desc == "TABLE DATA")
    via_root = dataclasses.replace(head, entries={**head.entries, entry.dump_id: dataclasses.replace(
        entry, copy_stmt="COPY public.events (at, what) FROM stdin;\n")})
    assert entry.dump_id in as_owner and entry.dump_id not in frozen_copies(target, "frozen_src", via_root)

    # The rewritten table of contents parses back with the new statements and everything else as it was.
    rewritten = with_copy_statements(head, head_bytes, as_owner)
    again = parse_head(rewritten)
    assert again.data_start == len(rewritten)
    assert {i: e.copy_stmt for i, e in again.entries.items() if i in as_owner} == as_owner
    assert [(e.dump_id, e.desc, e.tag, e.namespace, e.dependencies, e.copy_stmt) for e in again.entries.values()
            if e.dump_id not in as_owner] == [(e.dump_id, e.desc, e.tag, e.namespace, e.dependencies, e.copy_stmt)
                                              for e in head.entries.values() if e.dump_id not in as_owner]


def test_a_range_is_read_by_libpq_in_process_as_psql_reads_it_and_failures_say_why(
    source: PostgresConnection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    statement = (f'COPY (SELECT id, note, doc, raw, at, n FROM ONLY "{SCHEMA.replace(chr(34), 2 * chr(34))}".'
                 "\"big.table\" WHERE ctid >= '(10,0)'::tid) TO STDOUT")
    assert tasks.pg_checksums._libpq() is not None  # this machine's client tools come with a libpq
    in_process = tasks.pg_checksums.digest_copy(source, source.database, statement)
    monkeypatch.setattr(tasks.pg_checksums, "_LIBPQ", [None])  # as where no libpq can be loaded: psql reads
    assert tasks.pg_checksums.digest_copy(source, source.database, statement) == in_process
    assert 100000 < in_process[0] < 120000
    monkeypatch.undo()

    with pytest.raises(DumpFailed, match='COPY of .* failed: ERROR: +relation "nowhere" does not exist'):
        tasks.pg_checksums.digest_copy(source, source.database, "COPY (SELECT * FROM nowhere) TO STDOUT")
    wrong = source.model_copy(update={"password": SecretStr("not-the-password-8c1f")})
    with pytest.raises(ConnectionFailed, match="cannot connect to PostgreSQL .*password authentication failed") as err:
        tasks.pg_checksums.digest_copy(wrong, source.database, statement)
    assert "not-the-password-8c1f" not in str(err.value)
