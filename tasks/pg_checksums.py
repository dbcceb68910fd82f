"""Per-table checksums of a PostgreSQL database and their comparison with a manifest's: by SQL (``h64sum:``)
or by reading a data-only ``pg_dump`` through the archive scanner (``xxh64sum:``, ``tasks.archive``), and
``ExitChecked``, the reader of a dump tool's stdout that the backup and these checksums share."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable

import psycopg
from psycopg import sql

from blocks.errors import DumpFailed
from blocks.postgres import PostgresConnection
from tasks._dumpscan import ConnectError, CopyError, Scanner, copy_digest
from tasks.archive import CHECKSUM_ENV, ArchiveDigest, ArchiveFormatError, UnsupportedArchive
from tasks.archive import METHOD as ARCHIVE_METHOD
from tasks.findings import pattern_literal
from tasks.log import run_logger
from tasks.manifest import TableChecksum
from tasks.process import Child, describe_exit, pg_tool, spawn
from tasks.stream import CHUNK

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


def _stable_session(conn: psycopg.Connection) -> None:
    for statement in _STABLE_TEXT:
        conn.execute(statement)


def user_relations(conn: psycopg.Connection) -> list[tuple[str, str, str, int]]:
    """User tables and sequences: (schema, name, relkind, bytes), in catalog order."""
    return conn.execute(
        "SELECT n.nspname, c.relname, c.relkind, pg_relation_size(c.oid) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'S') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' "
        "AND c.relpersistence <> 't' ORDER BY 1, 2"
    ).fetchall()  # type: ignore[return-value]


def checksum_relation(conn: psycopg.Connection, schema: str, name: str, kind: str, size: int,
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
    return [checksum_relation(conn, *rel, max_table_bytes) for rel in user_relations(conn)]


def collect_checksums_parallel(pg: PostgresConnection, database: str, *, workers: int = 2) -> list[TableChecksum]:
    """``collect_checksums`` of a database nobody writes to (a fresh restore), ``workers`` tables at a time,
    biggest first. Same result, same order."""
    with pg.connect(database) as conn:
        relations = user_relations(conn)
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
                results[index] = checksum_relation(conn, *relations[index], None)

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


def table_pattern(schema: str, name: str) -> str:
    """A pg_dump ``--table`` pattern that matches exactly this table."""
    return f"{pattern_literal(schema)}.{pattern_literal(name)}"


def digest_dump(pg: PostgresConnection, database: str, patterns: list[str] | None) -> list[TableChecksum]:
    digest = ArchiveDigest()
    argv = [pg_tool("pg_dump"), "--format=custom", "--compress=0", "--data-only", "--no-password"]
    argv += [f"--table={p}" for p in patterns or []]
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with spawn(argv, env={**pg.libpq_env(database), **CHECKSUM_ENV}) as child:
        source = ExitChecked(child, pg.describe(database), tap=digest)
        while source.readinto(view):
            pass
    if source.unsupported is not None:
        raise source.unsupported
    return digest.checksums()


# The session ``pg_dump`` sets up (its setup_connection), for reading a table's COPY text with ``psql``
# exactly as ``pg_dump --data-only`` writes it.
_PG_DUMP_SESSION = "-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 -c search_path= " \
    "-c row_security=off"


def copy_columns(conn: psycopg.Connection, schema: str, name: str) -> list[str]:
    """The columns ``pg_dump`` lists in a table's COPY: not dropped, not generated, in order."""
    rows = conn.execute(
        "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s "
        "AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
        (schema, name)).fetchall()
    return [row[0] for row in rows]


def digest_copy(pg: PostgresConnection, database: str, statement: str) -> tuple[int, int]:
    """(rows, sum of XXH64 per row) of the COPY text ``statement`` (a ``COPY (...) TO STDOUT``) writes, read in
    ``pg_dump``'s session settings and hashed as the scanner hashes a dump's table data: by libpq in this
    process (``copy_digest``, no pipe, GIL released), or by ``psql`` where no libpq can be loaded here."""
    options = f"{CHECKSUM_ENV['PGOPTIONS']} {_PG_DUMP_SESSION}"
    libpq = _libpq()
    if libpq is not None:
        params = {**pg.libpq_params(database), "options": f"{options} -c TimeZone={CHECKSUM_ENV['PGTZ']}"}
        try:
            return copy_digest(libpq, list(params), list(params.values()), statement)
        except ConnectError as exc:
            raise pg.connection_failed(database, str(exc)) from None
        except CopyError as exc:
            raise DumpFailed(f"COPY of {pg.describe(database)} failed: {str(exc)[-2000:]}") from None
    scanner = Scanner(4)
    scanner.feed(b"\x01\x00" + (1).to_bytes(4, "little"))  # a data block of dump id 1
    env = {**pg.libpq_env(database), **CHECKSUM_ENV, "PGOPTIONS": options}
    argv = [pg_tool("psql"), "--no-psqlrc", "--quiet", "--no-password", "--set=ON_ERROR_STOP=1", "--file=-"]
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with spawn(argv, env=env, stdin=True) as child:
        child.stdin.write(statement.encode() + b"\n")
        child.stdin.close()
        while count := child.stdout.readinto(view):  # type: ignore[attr-defined]
            scanner.feed(b"\x00" + count.to_bytes(4, "little"))
            scanner.feed(view[:count])
        code = child.wait()
    if code != 0:
        raise DumpFailed(f"psql COPY of {pg.describe(database)} failed ({describe_exit(code)}): "
                         f"{child.stderr_tail()}")
    ((_dump_id, rows, total, _is_data, _start, _end),) = scanner.feed(b"\x00" + (0).to_bytes(4, "little"))
    return rows, total


_LIBPQ: list[str | None] = []


def _libpq() -> str | None:
    """The libpq that ``copy_digest`` can load (the one the client tools use), or None; looked up once."""
    if not _LIBPQ:
        found = None
        for name in dict.fromkeys([ctypes.util.find_library("pq"), "libpq.so.5"]):
            if name is None:
                continue
            try:
                ctypes.CDLL(name)
            except OSError:
                continue
            found = name
            break
        if found is None:
            run_logger().warning("no libpq could be loaded in this process; table ranges are read with psql")
        _LIBPQ.append(found)
    return _LIBPQ[0]


def digest_database(pg: PostgresConnection, database: str, *, workers: int = 2) -> list[TableChecksum]:
    """``xxh64sum`` checksums of a database nobody writes to (a fresh restore): the same ``pg_dump``, data only,
    read by the same parser as at backup time, plus sequence values.

    With ``workers`` > 1 the tables are split into that many groups of about equal size (biggest first), each
    read by its own ``pg_dump --table ...``; the union is the same as one whole dump's.
    """
    with pg.connect(database) as conn:
        relations = user_relations(conn)
        sequences = [checksum_relation(conn, *rel, None) for rel in relations if rel[2] == "S"]
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
        groups[smallest].append(table_pattern(schema, name))
        sizes[smallest] += size
    if whole and (len(groups) == 1 or sum(len(p) for g in groups for p in g) > 64 * 1024):
        return digest_dump(pg, database, None)
    groups = [chunk for group in groups if group for chunk in bounded(group)]  # never an empty --table list
    results: list[list[TableChecksum]] = [[] for _ in groups]

    def work(index: int, _failed: threading.Event) -> None:
        results[index] = digest_dump(pg, database, groups[index])

    _in_threads(work, len(groups))
    return [t for group in results for t in group]


def bounded(patterns: list[str], limit: int = 32 * 1024) -> list[list[str]]:
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



def checksums_like(
    pg: PostgresConnection, database: str, expected: list[TableChecksum], *, workers: int = 2
) -> list[TableChecksum]:
    """The restored database's checksums, computed the way ``expected`` (the manifest's) were."""
    if any((t.checksum or "").startswith(f"{ARCHIVE_METHOD}:") for t in expected):
        return digest_database(pg, database, workers=workers)
    return collect_checksums_parallel(pg, database, workers=workers)


def rows_only(pg: PostgresConnection, database: str, expected: list[TableChecksum],
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


class ExitChecked:
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
