"""PostgreSQL steps: list databases, dump one database or the globals into the store, restore them,
and the per-table checksums that prove a restore equals the dump."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from blocks.errors import ConfigurationError, DumpFailed, RestoreFailed, RunbookError, VerificationFailed
from blocks.postgres import PostgresConnection
from blocks.store import BackupStore
from tasks.archive import (
    CHECKSUM_ENV,
    ArchiveDigest,
    ArchiveFormatError,
    ArchiveHead,
    UnsupportedArchive,
    locking_items,
    read_head,
)
from tasks.archive import METHOD as ARCHIVE_METHOD
from tasks.databases import (
    apply_statements,
    compare_properties,
    create_statement,
    missing_roles,
    read_properties,
)
from tasks.findings import pattern_literal
from tasks.log import run_logger
from tasks.manifest import DatabaseProperties, Part, TableChecksum, part_key
from tasks.process import Child, describe_exit, pg_tool, run, spawn, tool_version
from tasks.progress import Progress
from tasks.retry import retry_transient
from tasks.stream import CHUNK, compress_into_store, open_decompressed_reader

# Settings that make ``row::text`` the same on the dumped and the restored server.
_STABLE_TEXT = (
    "SET TimeZone = 'UTC'",
    "SET DateStyle = 'ISO, YMD'",
    "SET IntervalStyle = 'postgres'",
    "SET extra_float_digits = 3",
    "SET bytea_output = 'hex'",
    # Checksums run beside a dump or a restore: parallel workers would only take a core from them.
    "SET max_parallel_workers_per_gather = 0",
)


@dataclass(frozen=True)
class ServerInfo:
    version: str
    databases: list[str]
    total_bytes: int


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def inspect_server(pg: PostgresConnection, databases: list[str] | None = None) -> ServerInfo:
    """Server version and the databases to back up (all non-template ones unless named); checks they exist."""
    with pg.connect() as conn:
        version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        rows = conn.execute(
            # pg_database_size needs CONNECT: a user allowed into some databases only can back those up.
            "SELECT datname, CASE WHEN has_database_privilege(datname, 'CONNECT') THEN pg_database_size(datname) "
            "ELSE 0 END FROM pg_database WHERE NOT datistemplate AND datallowconn ORDER BY datname"
        ).fetchall()
    sizes = {name: size for name, size in rows}
    if databases:
        missing = [d for d in databases if d not in sizes]
        if missing:
            raise ConfigurationError(
                f"database(s) {missing} not found on {pg.describe()}; it has {sorted(sizes)}"
            )
        chosen = list(databases)
    else:
        chosen = list(sizes)
    run_logger().info("PostgreSQL %s at %s: backing up %s", version, pg.describe(), chosen)
    return ServerInfo(version=version, databases=chosen, total_bytes=sum(sizes[d] for d in chosen))


def _stable_session(conn: psycopg.Connection) -> None:
    for statement in _STABLE_TEXT:
        conn.execute(statement)


def _relations(conn: psycopg.Connection) -> list[tuple[str, str, str, int]]:
    """User tables and sequences: (schema, name, relkind, bytes), in catalog order."""
    return conn.execute(
        "SELECT n.nspname, c.relname, c.relkind, pg_relation_size(c.oid) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'S') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' "
        "AND c.relpersistence <> 't' ORDER BY 1, 2"
    ).fetchall()  # type: ignore[return-value]


def _checksum_relation(conn: psycopg.Connection, schema: str, name: str, kind: str, size: int,
                       max_table_bytes: int | None) -> TableChecksum:
    ident = sql.Identifier(schema, name)
    if kind == "S":
        last, called = conn.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(ident)).fetchone()  # type: ignore[misc]
        return TableChecksum(schema_name=schema, table=name, rows=0, checksum=f"seq:{last}:{called}")
    if max_table_bytes is not None and size > max_table_bytes:
        rows = conn.execute(sql.SQL("SELECT count(*) FROM ONLY {}").format(ident)).fetchone()[0]  # type: ignore[index]
        return TableChecksum(schema_name=schema, table=name, rows=rows, checksum=None)
    rows, total = conn.execute(
        sql.SQL("SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text FROM ONLY {} AS t").format(ident)
    ).fetchone()  # type: ignore[misc]
    return TableChecksum(schema_name=schema, table=name, rows=rows, checksum=f"h64sum:{total}")


def collect_checksums(
    conn: psycopg.Connection, *, max_table_bytes: int | None = None
) -> list[TableChecksum]:
    """Row count and content checksum of every user table, and every sequence's value, by SQL.

    The checksum is the sum of ``hashtextextended(row::text, 0)`` over the rows (``h64sum:``):
    order-independent, one sequential scan, no sort. Backups record ``xxh64sum:`` checksums read off the
    dump instead (``tasks.archive``, far cheaper); this one is the backup's fallback when the scanner does
    not know the archive's version, verifies the sets that fallback (or an older release) made, and compares
    two live databases directly (the demo, the tests). Tables larger than ``max_table_bytes`` get a row count
    only.
    Runs in whatever transaction (snapshot) the connection is in.
    """
    _stable_session(conn)
    return [_checksum_relation(conn, *rel, max_table_bytes) for rel in _relations(conn)]


def collect_checksums_parallel(pg: PostgresConnection, database: str, *, workers: int = 2) -> list[TableChecksum]:
    """``collect_checksums`` of a database nobody writes to (a fresh restore), ``workers`` tables at a time,
    biggest first. Same result, same order."""
    with pg.connect(database) as conn:
        relations = _relations(conn)
    queue = sorted(range(len(relations)), key=lambda i: -relations[i][3])
    results: dict[int, TableChecksum] = {}
    lock = threading.Lock()

    def worker(_index: int, failed: threading.Event) -> None:
        with pg.connect(database) as conn:
            _stable_session(conn)
            while True:
                with lock:
                    if not queue or failed.is_set():
                        return
                    index = queue.pop(0)
                results[index] = _checksum_relation(conn, *relations[index], None)

    _in_threads(worker, max(1, min(workers, len(queue))))
    return [results[i] for i in range(len(relations))]


def _in_threads(work: Callable[[int, threading.Event], None], count: int) -> None:
    """Run ``work(i, failed)`` for i in 0 .. count - 1, each in a thread, and wait for all. The first error is
    raised here; ``failed`` is set as soon as one fails, for workers that take items from a shared queue."""
    errors: list[BaseException] = []
    failed = threading.Event()

    def guarded(index: int) -> None:
        try:
            work(index, failed)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)
            failed.set()

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _table_pattern(schema: str, name: str) -> str:
    """A pg_dump ``--table`` pattern that matches exactly this table."""
    return f"{pattern_literal(schema)}.{pattern_literal(name)}"


def _digest_dump(pg: PostgresConnection, database: str, patterns: list[str] | None) -> list[TableChecksum]:
    digest = ArchiveDigest()
    argv = [pg_tool("pg_dump"), "--format=custom", "--compress=0", "--data-only", "--no-password"]
    argv += [f"--table={p}" for p in patterns or []]
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with spawn(argv, env={**pg.libpq_env(database), **CHECKSUM_ENV}) as child:
        source = _ExitChecked(child, pg.describe(database), tap=digest)
        while source.readinto(view):
            pass
    if source.unsupported is not None:
        raise source.unsupported
    return digest.checksums()


def digest_database(pg: PostgresConnection, database: str, *, workers: int = 2) -> list[TableChecksum]:
    """``xxh64sum`` checksums of a database nobody writes to (a fresh restore): the same ``pg_dump``, data only,
    read by the same parser as at backup time, plus sequence values.

    With ``workers`` > 1 the tables are split into that many groups of about equal size (biggest first), each
    read by its own ``pg_dump --table ...``; the union is the same as one whole dump's.
    """
    with pg.connect(database) as conn:
        relations = _relations(conn)
        sequences = [_checksum_relation(conn, *rel, None) for rel in relations if rel[2] == "S"]
    tables = [(schema, name, size) for schema, name, kind, size in relations if kind == "r"]
    found = _digest_tables(pg, database, tables, workers, whole=True)
    return sorted([*found, *sequences], key=lambda t: (t.schema_name, t.table))


def _digest_tables(pg: PostgresConnection, database: str, tables: list[tuple[str, str, int]], workers: int,
                   *, whole: bool) -> list[TableChecksum]:
    """``tables`` read in ``workers`` groups of about equal size; ``whole``: the tables are all the database's,
    so one group may be read as one whole-database dump (no argv of unbounded length)."""
    if not tables:
        return []
    ordered = sorted(tables, key=lambda t: -t[2])
    groups: list[list[str]] = [[] for _ in range(max(1, min(workers, len(ordered))))]
    sizes = [0] * len(groups)
    for schema, name, size in ordered:
        smallest = min(range(len(groups)), key=lambda i: (sizes[i], len(groups[i])))
        groups[smallest].append(_table_pattern(schema, name))
        sizes[smallest] += size
    if whole and (len(groups) == 1 or sum(len(p) for g in groups for p in g) > 64 * 1024):
        return _digest_dump(pg, database, None)
    groups = [chunk for group in groups if group for chunk in _bounded(group)]  # never an empty --table list
    results: list[list[TableChecksum]] = [[] for _ in groups]

    def work(index: int, _failed: threading.Event) -> None:
        results[index] = _digest_dump(pg, database, groups[index])

    _in_threads(work, len(groups))
    return [t for group in results for t in group]


def _bounded(patterns: list[str], limit: int = 32 * 1024) -> list[list[str]]:
    """``patterns`` cut into lists whose argv stays under ``limit`` bytes."""
    chunks: list[list[str]] = [[]]
    size = 0
    for pattern in patterns:
        if chunks[-1] and size + len(pattern) > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(pattern)
        size += len(pattern) + 10
    return chunks


_TABLE_LOADED = re.compile(r"^pg_restore: finished item \d+ TABLE DATA (.+)$")
_ITEM_DONE = re.compile(r"^pg_restore: finished item (\d+) ")


class _ReadBack:
    """Reads restored tables back with the backup's own scanner, in ``workers`` threads: while pg_restore
    runs, one table at a time as ``pg_restore --verbose`` reports it loaded (its COPY committed), beside the
    restore's own jobs; once the restore has ended, every table not read yet, ``workers`` at a time, biggest
    first.

    With the archive's table of contents (``head``) the items pg_restore reports are known by dump id: a
    table is read beside only once the post-data items that lock it exclusively (a primary key, a unique
    constraint) are done, so the read never holds up the restore. Without it, pg_restore names a loaded
    table without its schema: a name found in several schemas waits for the end.
    """

    _BATCH_BYTES = 64 * 1024 * 1024  # small tables are read several to one pg_dump, up to this size

    def __init__(self, pg: PostgresConnection, database: str, workers: int, head: ArchiveHead | None = None) -> None:
        self.pg, self.database = pg, database
        self.items = {dump_id: (e.namespace or "", e.tag or "") for dump_id, e in head.entries.items()
                      if e.desc == "TABLE DATA"} if head is not None else None
        self.blockers = locking_items(head) if head is not None else {}
        self.blocker_of = {dump_id: table for table, ids in self.blockers.items() for dump_id in ids}
        self.loaded_tables: set[tuple[str, str]] = set()
        with pg.connect(database) as conn:
            relations = _relations(conn)
        self.tables = {(schema, name): size for schema, name, kind, size in relations if kind == "r"}
        self.sequences = [rel for rel in relations if rel[2] == "S"]
        counts = Counter(name for _schema, name in self.tables)
        self.by_name = {name: (schema, name) for schema, name in self.tables if counts[name] == 1}
        self.pending: list[tuple[str, str]] = []
        self.taken: set[tuple[str, str]] = set()
        self.found: list[TableChecksum] = []
        self.error: BaseException | None = None
        self.limit, self.active = 1, 0
        self.closed = self.ended = False
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(max(1, workers))]
        for thread in self.threads:
            thread.start()

    def loaded(self, line: str) -> None:
        """pg_restore's stderr, line by line."""
        if self.items is None:
            match = _TABLE_LOADED.match(line)
            if match and match.group(1) in self.by_name:
                self._ready(self.by_name[match.group(1)])
            return
        done = _ITEM_DONE.match(line)
        if done is None:
            return
        dump_id = int(done.group(1))
        if dump_id in self.items:
            self.loaded_tables.add(self.items[dump_id])
            self._ready(self.items[dump_id])
            return
        table = self.blocker_of.get(dump_id)
        if table is not None:
            self.blockers[table].discard(dump_id)
            self._ready(table)

    def _ready(self, table: tuple[str, str]) -> None:
        """Queue ``table`` for reading once its data is in and nothing will lock it exclusively any more."""
        if self.items is not None and (table not in self.loaded_tables or self.blockers.get(table)):
            return
        with self.cond:
            if table in self.tables and table not in self.taken:
                self.taken.add(table)
                self.pending.append(table)
                self.cond.notify()

    def _next_batch(self) -> list[tuple[str, str]] | None:
        """Under the lock: the tables to read next, or None when this worker is done."""
        while True:
            if self.closed or self.error is not None or (self.ended and not self.pending):
                return None
            if self.pending and self.active < self.limit:
                batch = [self.pending.pop(0)]
                size = self.tables[batch[0]]
                while self.ended and self.pending and size + self.tables[self.pending[0]] <= self._BATCH_BYTES:
                    size += self.tables[self.pending[0]]
                    batch.append(self.pending.pop(0))
                self.active += 1
                return batch
            self.cond.wait()

    def _work(self) -> None:
        while True:
            with self.cond:
                batch = self._next_batch()
            if batch is None:
                return
            try:
                found = [t for chunk in _bounded([_table_pattern(*table) for table in batch])
                         for t in _digest_dump(self.pg, self.database, chunk)]
            except BaseException as exc:  # noqa: BLE001 - raised in finish(), in the caller's thread
                with self.cond:
                    self.error = self.error or exc
                    self.active -= 1
                    self.cond.notify_all()
                return
            with self.cond:
                self.found += found
                self.active -= 1
                self.cond.notify_all()

    def abandon(self) -> None:
        """The restore failed: stop reading (a read under way ends when its database is dropped)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def finish(self) -> list[TableChecksum]:
        """Once the restore has ended: read what is left, and the sequences; the whole database's checksums."""
        with self.pg.connect(self.database) as conn:  # the sizes now that the data is in
            sizes = {(schema, name): size for schema, name, kind, size in _relations(conn) if kind == "r"}
        with self.cond:
            self.tables.update((t, sizes.get(t, 0)) for t in self.tables)
            rest = sorted((t for t in self.tables if t not in self.taken), key=lambda t: -self.tables[t])
            self.taken.update(rest)
            self.pending = sorted(self.pending + rest, key=lambda t: -self.tables[t])
            self.ended, self.limit = True, len(self.threads)
            self.cond.notify_all()
        for thread in self.threads:
            thread.join()
        if self.error is not None:
            raise self.error
        with self.pg.connect(self.database) as conn:
            sequences = [_checksum_relation(conn, *rel, None) for rel in self.sequences]
        return sorted([*self.found, *sequences], key=lambda t: (t.schema_name, t.table))


def checksums_like(
    pg: PostgresConnection, database: str, expected: list[TableChecksum], *, workers: int = 2
) -> list[TableChecksum]:
    """The restored database's checksums, computed the way ``expected`` (the manifest's) were."""
    if any((t.checksum or "").startswith(f"{ARCHIVE_METHOD}:") for t in expected):
        return digest_database(pg, database, workers=workers)
    return collect_checksums_parallel(pg, database, workers=workers)


def _rows_only(pg: PostgresConnection, database: str, expected: list[TableChecksum],
               unsupported: UnsupportedArchive) -> tuple[list[TableChecksum], list[TableChecksum]]:
    """(expected, actual) with row counts and sequence values only, for when the local pg_dump writes an
    archive version the scanner does not know, so the restored tables cannot be read back the way the
    backup's checksums were made."""
    run_logger().warning("comparing row counts and sequences of %s only, not content checksums: %s",
                         pg.describe(database), unsupported)
    with pg.connect(database) as conn:
        actual = collect_checksums(conn, max_table_bytes=-1)  # every table: its row count only
    kept = [t if (t.checksum or "").startswith("seq:") else t.model_copy(update={"checksum": None})
            for t in expected]
    return kept, actual


def compare_checksums(expected: list[TableChecksum], actual: list[TableChecksum]) -> list[str]:
    """Human-readable differences; empty when every table and sequence matches."""
    want = {t.qualified: t for t in expected}
    have = {t.qualified: t for t in actual}
    problems = [f"{name}: missing after restore" for name in sorted(set(want) - set(have))]
    problems += [f"{name}: not in the backup" for name in sorted(set(have) - set(want))]
    for name in sorted(set(want) & set(have)):
        w, h = want[name], have[name]
        if w.rows != h.rows:
            problems.append(f"{name}: {h.rows} rows, backup had {w.rows}")
        elif w.checksum is not None and w.checksum != h.checksum:
            problems.append(f"{name}: content checksum differs")
    return problems


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE, retry_condition_fn=retry_transient,
      task_run_name="dump-database-{database}")
def dump_database(
    pg: PostgresConnection,
    database: str,
    store: BackupStore,
    set_id: str,
    *,
    table_checksums: bool = True,
    checksum_max_table_bytes: int | None = None,
    level: int = 1,
    threads: int = 2,
    progress: Progress | None = None,
) -> Part:
    """``pg_dump -Fc -Z0`` of one database, streamed through zstd and sha256 into the store.

    Each table's row count and checksum are read off the dump's own COPY data as it streams past
    (``tasks.archive``); sequence values come from the dump's exported snapshot. So they describe exactly
    the data in the dump, and cost no second scan of the tables. A ``pg_dump`` that writes an archive
    version the scanner does not know still makes a backup: the checksums are then computed by SQL
    (``h64sum:``) in the dump's snapshot, with a warning.
    """
    log = run_logger()
    key = part_key(set_id, "postgres", database)
    pg_dump = pg_tool("pg_dump")
    started = time.monotonic()
    with pg.connect(database, autocommit=True) as snap_conn:
        server_version = str(snap_conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        snap_conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snapshot = str(snap_conn.execute("SELECT pg_export_snapshot()").fetchone()[0])  # type: ignore[index]
        properties = read_properties(snap_conn, database)
        relations = _relations(snap_conn) if table_checksums else []
        sequences = [_checksum_relation(snap_conn, *rel, None) for rel in relations if rel[2] == "S"]
        log.info("dumping %s into %s", pg.describe(database), key)
        digest = ArchiveDigest() if table_checksums else None
        argv = [pg_dump, "--format=custom", "--compress=0", f"--snapshot={snapshot}", "--no-password"]
        with spawn(argv, env={**pg.libpq_env(database), **CHECKSUM_ENV}) as child:
            source = _ExitChecked(child, pg.describe(database), tap=digest)
            stored = compress_into_store(
                store.get_client(), key, source,
                level=level, threads=threads, on_progress=progress.advance if progress else None,
            )
        checksums: list[TableChecksum] = []
        if source.unsupported is not None:
            log.warning("table checksums of %s by SQL, a second read of every table: %s", pg.describe(database),
                        source.unsupported)
            digest = None
            checksums = collect_checksums(snap_conn, max_table_bytes=checksum_max_table_bytes)
        snap_conn.execute("COMMIT")
    if digest is not None:
        try:
            tables = digest.checksums()
        except ArchiveFormatError as exc:
            raise DumpFailed(f"table checksums of {pg.describe(database)}: {exc}") from exc
        too_big = {(schema, name) for schema, name, kind, size in relations
                   if kind == "r" and checksum_max_table_bytes is not None and size > checksum_max_table_bytes}
        for table in tables:
            if (table.schema_name, table.table) in too_big:
                table.checksum = None
        checksums = sorted([*tables, *sequences], key=lambda t: (t.schema_name, t.table))
    part = Part(
        kind="postgres", name=database, key=key, size=stored.size, raw_size=stored.raw_size,
        sha256=stored.sha256, compression_level=level, tool="pg_dump -Fc -Z0",
        tool_version=tool_version(pg_dump), server_version=server_version,
        seconds=round(time.monotonic() - started, 3), tables=checksums, database=properties,
    )
    log.info("dumped %s: %d bytes -> %d stored, %d tables checksummed",
             pg.describe(database), part.raw_size, part.size, len(checksums))
    return part


class _ExitChecked:
    """A child's stdout that, at EOF, raises DumpFailed unless the tool exited 0.

    Raising before the store writer commits is what keeps a failed dump from ever being stored.
    """

    def __init__(self, child: Child, target: str, tap: ArchiveDigest | None = None) -> None:
        self.child = child
        self.target = target
        self.tap = tap
        self.unsupported: UnsupportedArchive | None = None  # the tap stopped: an archive version it does not know

    def readinto(self, buffer: memoryview) -> int:
        count = self.child.stdout.readinto(buffer)  # type: ignore[attr-defined]
        if count and self.tap is not None:
            try:
                self.tap.feed(buffer[:count])
            except UnsupportedArchive as exc:
                self.unsupported, self.tap = exc, None
            except ArchiveFormatError as exc:
                raise DumpFailed(f"reading the dump of {self.target}: {exc}") from exc
        if not count:
            code = self.child.wait()
            if code != 0:
                raise DumpFailed(
                    f"{self.child.proc.args[0]} of {self.target} failed ({describe_exit(code)}): "
                    f"{self.child.stderr_tail()}"
                )
        return count


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def dump_globals(
    pg: PostgresConnection, store: BackupStore, set_id: str, *, no_role_passwords: bool = False, level: int = 3
) -> Part:
    """``pg_dumpall --globals-only``: roles (with their password hashes unless told not to) and tablespaces."""
    key = part_key(set_id, "globals")
    tool = pg_tool("pg_dumpall")
    argv = [tool, "--globals-only", "--no-password"]
    if no_role_passwords:
        argv.append("--no-role-passwords")  # managed PostgreSQL does not let anyone read pg_authid
    started = time.monotonic()
    with pg.connect() as conn:
        server_version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    with spawn(argv, env=pg.libpq_env()) as child:
        stored = compress_into_store(
            store.get_client(), key, _ExitChecked(child, pg.describe()), level=level, threads=0
        )
    run_logger().info("dumped globals of %s into %s", pg.describe(), key)
    return Part(
        kind="globals", name="globals", key=key, size=stored.size, raw_size=stored.raw_size,
        sha256=stored.sha256, compression_level=level, tool=" ".join(["pg_dumpall", *argv[1:]]),
        tool_version=tool_version(tool), server_version=server_version,
        seconds=round(time.monotonic() - started, 3),
    )


# ------------------------------------------------------------------------------------------ restore


@dataclass(frozen=True)
class RestoredDatabase:
    database: str
    tables: int
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)  # seconds per step, in order


def _conninfo_dbname(name: str) -> str:
    """``dbname='...'`` for tools that read -d as a connection string (a name may contain '=')."""
    escaped = name.replace("\\", "\\\\").replace("'", "\\'")
    return f"dbname='{escaped}'"


@task(cache_policy=NO_CACHE, task_run_name="restore-database-{database}")
def restore_database(
    part: Part,
    store: BackupStore,
    pg: PostgresConnection,
    database: str,
    *,
    verify: bool = True,
    staged_file: str | None = None,
    jobs: int = 1,
    properties: bool = True,
) -> RestoredDatabase:
    """Create ``database`` (it must not exist) and restore the dump into it, then compare checksums.

    The database is created with the source's encoding and locale; with ``properties`` it also gets the
    source's owner, privileges, settings, connection limit and comment (their roles must exist: restore the
    globals first), and ``verify`` compares them too. From the store the dump streams into one
    ``pg_restore``; from a ``staged_file`` (see ``stage_part``, checksum already verified) ``pg_restore -j
    jobs`` runs in parallel. On any failure the database this step created is dropped again; nothing else
    is touched.
    """
    log = run_logger()
    started = time.monotonic()
    steps: dict[str, float] = {}
    mark = started

    def step(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        steps[name] = round(now - mark, 2)
        mark = now

    recorded: DatabaseProperties | None = part.database
    with pg.connect(autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if exists:
            raise ConfigurationError(
                f"database {database!r} already exists on {pg.describe()}; restore into a new name"
            )
        if properties and recorded is not None:
            missing = missing_roles(admin, recorded)
            if missing:
                raise ConfigurationError(
                    f"roles {missing} named by database {part.name!r}'s owner, privileges or settings do not exist "
                    f"on {pg.describe()}: restore the set's globals first; nothing was changed")
        try:
            admin.execute(create_statement(database, recorded))
        except psycopg.Error as exc:
            raise RestoreFailed(f"cannot create {pg.describe(database)} like the backed-up database "
                                f"({exc.diag.message_primary or exc}); nothing was changed") from None
    step("create database")
    log.info("restoring %s into %s", part.key, pg.describe(database))
    readback: _ReadBack | None = None
    try:
        argv = [pg_tool("pg_restore"), "--exit-on-error", "--no-password",
                f"--dbname={_conninfo_dbname(database)}"]
        read_beside = (staged_file is not None and verify and jobs > 1
                       and any((t.checksum or "").startswith(f"{ARCHIVE_METHOD}:") for t in part.tables))
        if staged_file is not None and read_beside:
            # Schema first, so the tables are known; then data and indexes in parallel, each table read
            # back as soon as its data is in, on the core the restore leaves idle.
            _run_restore(pg, database, [*argv, "--section=pre-data", staged_file])
            step("schema (pg_restore --section=pre-data)")
            readback = _ReadBack(pg, database, jobs, head=_toc_of(staged_file))
            _run_restore(pg, database, [*argv, f"--jobs={jobs}", "--section=data", "--section=post-data",
                                        "--verbose", staged_file], on_stderr=readback.loaded)
            step(f"data and indexes (pg_restore -j{jobs}, tables read back beside)")
        elif staged_file is not None:
            _run_restore(pg, database, [*argv, f"--jobs={max(jobs, 1)}", staged_file])
            step(f"pg_restore -j{max(jobs, 1)}")
        else:
            _restore_streamed(part, store, pg, database, argv)
            step("pg_restore (streamed)")
        if properties and recorded is not None:
            with pg.connect(autocommit=True) as admin:
                for statement in apply_statements(database, recorded):
                    admin.execute(statement)
                problems = compare_properties(recorded, read_properties(admin, database)) if verify else []
            if problems:
                raise VerificationFailed(f"restored {pg.describe(database)} differs from the backup: "
                                         + "; ".join(problems))
            step("database properties")
        tables = 0
        if verify and part.tables:
            expected = part.tables
            try:
                actual = (readback.finish() if readback is not None
                          else checksums_like(pg, database, part.tables, workers=jobs))
            except UnsupportedArchive as exc:
                expected, actual = _rows_only(pg, database, part.tables, exc)
            problems = compare_checksums(expected, actual)
            if problems:
                raise VerificationFailed(
                    f"restored {pg.describe(database)} differs from the backup: " + "; ".join(problems[:10])
                )
            tables = len([t for t in part.tables if not (t.checksum or "").startswith("seq:")])
            step("tables not yet read back, sequences, comparison" if readback is not None
                 else "every table read back, comparison")
    except (RunbookError, OSError, psycopg.Error):
        if readback is not None:
            readback.abandon()
        _drop_quietly(pg, database)
        raise
    seconds = round(time.monotonic() - started, 3)
    log.info("restored %s in %.1f s (%d tables verified): %s", pg.describe(database), seconds, tables,
             ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()))
    return RestoredDatabase(database=database, tables=tables, seconds=seconds, steps=steps)


def _toc_of(staged_file: str) -> ArchiveHead | None:
    try:
        return read_head(staged_file)
    except (ArchiveFormatError, OSError) as exc:
        run_logger().warning("%s: %s; tables are read back by name as pg_restore reports them", staged_file, exc)
        return None


def _run_restore(pg: PostgresConnection, database: str, argv: list[str],
                 on_stderr: Callable[[str], None] | None = None) -> None:
    with spawn(argv, env=pg.libpq_env(database), stdout=False, on_stderr=on_stderr) as child:
        code = child.wait()
    if code != 0:
        errors = [line for line in child.stderr_lines if ": error:" in line or "ERROR" in line]
        detail = "\n".join(errors[-10:]) if errors else child.stderr_tail()
        raise RestoreFailed(f"pg_restore into {pg.describe(database)} failed ({describe_exit(code)}): {detail[-2000:]}")


def _restore_streamed(part: Part, store: BackupStore, pg: PostgresConnection, database: str, argv: list[str]) -> None:
    """Store -> sha256 check -> zstd -> one pg_restore (a pipe cannot be restored in parallel)."""
    with open_decompressed_reader(store.get_client(), part.key, sha256=part.sha256, size=part.size) as src:
        with spawn(argv, env=pg.libpq_env(database), stdin=True, stdout=False) as child:
            try:
                while chunk := src.read(CHUNK):
                    child.stdin.write(chunk)
                child.stdin.close()
            except BrokenPipeError:
                pass
            code = child.wait()
            if code != 0:
                raise RestoreFailed(
                    f"pg_restore into {pg.describe(database)} failed ({describe_exit(code)}): "
                    f"{child.stderr_tail()}"
                )


def _drop_quietly(pg: PostgresConnection, database: str) -> None:
    try:
        with pg.connect(autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    except RunbookError as exc:
        run_logger().warning("could not drop the half-restored %s: %s", database, exc)


_ROLE_STATEMENT = re.compile(r'^(?:CREATE|ALTER|COMMENT ON) ROLE ("(?:[^"]|"")*"|[A-Za-z_][A-Za-z0-9_$]*)[ ;]')


def _unquote_ident(text: str) -> str:
    return text[1:-1].replace('""', '"') if text.startswith('"') else text.lower()


def filter_globals(script: str, existing_roles: set[str]) -> tuple[str, list[str]]:
    """Drop the CREATE/ALTER/COMMENT ROLE lines of roles the target already has.

    pg_dumpall writes one statement per line; replaying ``ALTER ROLE postgres ... PASSWORD`` would
    change the password of the very role the restore connects with.
    """
    kept, skipped = [], set()
    for line in script.splitlines(keepends=True):
        match = _ROLE_STATEMENT.match(line)
        if match and _unquote_ident(match.group(1)) in existing_roles:
            skipped.add(_unquote_ident(match.group(1)))
            continue
        kept.append(line)
    return "".join(kept), sorted(skipped)


@dataclass(frozen=True)
class RestoredGlobals:
    roles_kept: list[str]


@task(cache_policy=NO_CACHE)
def restore_globals(part: Part, store: BackupStore, pg: PostgresConnection) -> RestoredGlobals:
    """Create the roles and tablespaces the target lacks; roles that exist stay exactly as they are."""
    argv = [pg_tool("psql"), "--no-psqlrc", "--quiet", "--no-password", "--set=ON_ERROR_STOP=1", "--file=-"]
    with open_decompressed_reader(store.get_client(), part.key, sha256=part.sha256, size=part.size) as src:
        script = src.read().decode()
    with pg.connect() as conn:
        existing = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles")}
    script, kept = filter_globals(script, existing)
    with spawn(argv, env=pg.libpq_env(), stdin=True, stdout=False) as child:
        child.stdin.write(script.encode())
        child.stdin.close()
        code = child.wait()
    if code != 0:
        raise RestoreFailed(f"globals restore on {pg.describe()} failed ({describe_exit(code)}): "
                            f"{child.stderr_tail()}")
    run_logger().info("restored globals on %s (existing roles left as they are: %s)", pg.describe(), kept)
    return RestoredGlobals(roles_kept=kept)


# ------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class AmcheckResult:
    database: str
    ok: bool
    problems: list[str]
    seconds: float


@task(cache_policy=NO_CACHE, task_run_name="amcheck-{database}")
def run_amcheck(pg: PostgresConnection, database: str, *, heapallindexed: bool = False) -> AmcheckResult:
    """``pg_amcheck`` (installing the amcheck extension if missing) on every table and B-tree index."""
    started = time.monotonic()
    argv = [pg_tool("pg_amcheck"), "--install-missing", "--no-password", f"--database={pattern_literal(database)}"]
    if heapallindexed:
        argv.append("--heapallindexed")
    code, out, err = run(argv, env=pg.libpq_env(database))
    problems = [line for line in (out + err).splitlines() if line.strip()][:50]
    ok = code == 0
    run_logger().info("pg_amcheck %s: %s", pg.describe(database), "ok" if ok else f"{len(problems)} problem lines")
    return AmcheckResult(database=database, ok=ok, problems=[] if ok else problems,
                         seconds=round(time.monotonic() - started, 3))


@task(cache_policy=NO_CACHE, task_run_name="compare-tables-{database}")
def compare_with_manifest(pg: PostgresConnection, database: str, part: Part, *, properties: bool = True) -> list[str]:
    """Differences between a restored database and what the manifest recorded at dump time: every table's
    rows and checksum and, with ``properties``, the database's own properties."""
    expected = part.tables
    try:
        actual = checksums_like(pg, database, part.tables)
    except UnsupportedArchive as exc:
        expected, actual = _rows_only(pg, database, part.tables, exc)
    problems = compare_checksums(expected, actual)
    if properties and part.database is not None:
        with pg.connect() as conn:
            problems += compare_properties(part.database, read_properties(conn, database))
    return problems


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def drop_scratch_databases(pg: PostgresConnection, names: list[str]) -> None:
    """Drop databases this run created for a drill (never called on anything else)."""
    with pg.connect(autocommit=True) as admin:
        for name in names:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    run_logger().info("dropped drill databases %s on %s", names, pg.describe())
