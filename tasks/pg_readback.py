"""``ReadBack``: reads a restored database's tables back with the backup's own scanner while, and after,
``pg_restore`` loads them, for ``restore_database`` to compare with the manifest."""

from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import dataclass

import psycopg
from psycopg import sql

from blocks.postgres import PostgresConnection
from tasks.archive import METHOD, ArchiveHead, locking_items
from tasks.log import run_logger
from tasks.manifest import TableChecksum
from tasks.pg_checksums import (
    bounded,
    checksum_relation,
    copy_columns,
    digest_copy,
    digest_dump,
    table_pattern,
    user_relations,
)

_TABLE_LOADED = re.compile(r"^pg_restore: finished item \d+ TABLE DATA (.+)$")
_ITEM_DONE = re.compile(r"^pg_restore: finished item (\d+) ")
_ITEM_STARTED = re.compile(r"^pg_restore: launching item (\d+) ")

Table = tuple[str, str]


@dataclass
class _Item:
    """One read: whole tables by ``pg_dump``, or one block range of a table by ``COPY (SELECT ...)``."""

    tables: list[Table]
    statement: str = ""  # a range's COPY statement
    split: _Split | None = None


@dataclass
class _Split:
    """A table read as several block ranges at once; the sum of their digests is the table's."""

    table: Table
    parts: int
    left: int
    rows: int = 0
    total: int = 0


class ReadBack:
    """Reads restored tables back with the backup's own scanner, in ``workers`` threads: while the restore
    runs, one read at a time, plus one for each of its ``workers`` jobs that is idle, as tables are reported
    loaded (their COPY committed) by ``pg_restore --verbose`` or by the data loaders (``tasks.pg_load``:
    ``finished``, ``loader_busy``); once the restore has ended, every table not read yet, ``workers`` at a
    time, biggest first.

    With the archive's table of contents (``head``) the items pg_restore reports are known by dump id: a
    table is read beside only once the post-data items that lock it exclusively (a primary key, a unique
    constraint) are done, so the read never holds up the restore. Without it, pg_restore names a loaded
    table without its schema: a name found in several schemas waits for the end.

    A table of ``_SPLIT_BYTES`` or more, on PostgreSQL 14 or later (block-range scans), is read as
    ``workers`` block ranges, each ``COPY (SELECT <pg_dump's columns> ...) TO STDOUT`` in ``pg_dump``'s
    session settings, so the ranges can go on two cores once the restore leaves them free. The digest is
    order-independent, so the ranges' digests add up to the table's. Should that sum differ from the
    manifest's (``expected``), the table is read again by ``pg_dump``, the backup's own tool, and that read
    is the one compared: a range read can only ever save time.
    """

    _BATCH_BYTES = 64 * 1024 * 1024  # small tables are read several to one pg_dump, up to this size
    _SPLIT_BYTES = 128 * 1024 * 1024

    def __init__(self, pg: PostgresConnection, database: str, workers: int, head: ArchiveHead | None = None,
                 expected: list[TableChecksum] | None = None) -> None:
        self.pg, self.database, self.workers = pg, database, max(1, workers)
        self.items = {dump_id: (e.namespace or "", e.tag or "") for dump_id, e in head.entries.items()
                      if e.desc == "TABLE DATA"} if head is not None else None
        self.blockers = locking_items(head) if head is not None else {}
        self.blocker_of = {dump_id: table for table, ids in self.blockers.items() for dump_id in ids}
        self.loaded_tables: set[Table] = set()
        self.expected = {(t.schema_name, t.table): t for t in expected or []
                         if (t.checksum or "").startswith(f"{METHOD}:")}
        with pg.connect(database) as conn:
            relations = user_relations(conn)
            self.block_size = int(conn.execute("SELECT current_setting('block_size')::int").fetchone()[0])  # type: ignore[index]
            self.ranges = conn.info.server_version >= 140000 and self.workers > 1
        self.tables = {(schema, name): size for schema, name, kind, size in relations if kind == "r"}
        self.sequences = [rel for rel in relations if rel[2] == "S"]
        counts = Counter(name for _schema, name in self.tables)
        self.by_name = {name: (schema, name) for schema, name in self.tables if counts[name] == 1}
        self.pending: list[_Item] = []
        self.taken: set[Table] = set()
        self.found: list[TableChecksum] = []
        self.error: BaseException | None = None
        self.running: set[int] = set()  # pg_restore's items under way (negative: a data loader's pg_restore)
        self.active = 0
        self.closed = self.ended = False
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(self.workers)]
        for thread in self.threads:
            thread.start()

    @property
    def limit(self) -> int:
        """How many reads may run now: all of them once the restore has ended; before, one, plus one for
        each of pg_restore's jobs that has nothing to do."""
        if self.ended:
            return self.workers
        return 1 + max(0, self.workers - len(self.running))

    def loaded(self, line: str) -> None:
        """pg_restore's stderr, line by line."""
        started = _ITEM_STARTED.match(line)
        if started is not None:
            with self.cond:
                self.running.add(int(started.group(1)))
            return
        done = _ITEM_DONE.match(line)
        if done is not None:
            with self.cond:
                self.running.discard(int(done.group(1)))
                self.cond.notify_all()
        if self.items is None:
            match = _TABLE_LOADED.match(line)
            if match and match.group(1) in self.by_name:
                self._ready(self.by_name[match.group(1)])
        elif done is not None:
            self.finished(int(done.group(1)))

    def finished(self, dump_id: int) -> None:
        """The archive item ``dump_id`` has been restored."""
        if self.items is not None and dump_id in self.items:
            self.loaded_tables.add(self.items[dump_id])
            self._ready(self.items[dump_id])
            return
        table = self.blocker_of.get(dump_id)
        if table is not None:
            self.blockers[table].discard(dump_id)
            self._ready(table)

    def loader_busy(self, index: int, busy: bool) -> None:
        """A data loader (``tasks.pg_load``) started or ended a pg_restore."""
        with self.cond:
            if busy:
                self.running.add(-1 - index)
            else:
                self.running.discard(-1 - index)
            self.cond.notify_all()

    def _ready(self, table: Table) -> None:
        """Queue ``table`` for reading once its data is in and nothing will lock it exclusively any more."""
        if self.items is not None and (table not in self.loaded_tables or self.blockers.get(table)):
            return
        with self.cond:
            if table in self.tables and table not in self.taken:
                self.taken.add(table)
                self.pending.append(_Item([table]))
                self.cond.notify()

    def _next_item(self) -> _Item | None:
        """Under the lock: the read to do next, or None when this worker is done."""
        while True:
            if self.closed or self.error is not None or (self.ended and not self.pending):
                return None
            if self.pending and self.active < self.limit:
                item = self.pending.pop(0)
                if self._batchable(item):
                    size = self.tables[item.tables[0]]
                    while self.ended and self.pending and self._batchable(self.pending[0]) \
                            and size + self.tables[self.pending[0].tables[0]] <= self._BATCH_BYTES:
                        size += self.tables[self.pending[0].tables[0]]
                        item.tables += self.pending.pop(0).tables
                self.active += 1
                return item
            self.cond.wait()

    def _batchable(self, item: _Item) -> bool:
        """A whole table small enough to share a pg_dump with others (not one to be read in block ranges)."""
        table = item.tables[0]
        return item.split is None and not (self._splittable(table) and self.tables[table] >= self._SPLIT_BYTES)

    def _splittable(self, table: Table) -> bool:
        """Block ranges are possible here, and the manifest's checksum is there to check their sum."""
        return self.ranges and table in self.expected

    def _work(self) -> None:
        conn: psycopg.Connection | None = None
        try:
            while True:
                with self.cond:
                    item = self._next_item()
                if item is None:
                    return
                if item.split is None and len(item.tables) == 1 and self._splittable(item.tables[0]):
                    conn = conn or self.pg.connect(self.database, autocommit=True)
                    item = self._split(conn, item.tables[0]) or item
                found = self._read(item)
                with self.cond:
                    self.found += found
                    self.active -= 1
                    self.cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - raised in finish(), in the caller's thread
            with self.cond:
                self.error = self.error or exc
                self.active -= 1
                self.cond.notify_all()
        finally:
            if conn is not None:
                conn.close()

    def _split(self, conn: psycopg.Connection, table: Table) -> _Item | None:
        """``table`` as ``workers`` block-range reads if it is big enough: the first, the rest queued first."""
        schema, name = table
        ident = sql.Identifier(schema, name)
        size = int(conn.execute("SELECT pg_relation_size(%s::regclass)", (ident.as_string(conn),)).fetchone()[0])  # type: ignore[index]
        columns = copy_columns(conn, schema, name)
        if size < self._SPLIT_BYTES or not columns:
            return None
        blocks = size // self.block_size
        bounds = [blocks * i // self.workers for i in range(self.workers + 1)]
        head = sql.SQL("COPY (SELECT {} FROM ONLY {}").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in columns), ident)
        statements = []
        for i in range(self.workers):
            low = sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({bounds[i]},0)"))
            # the last range is open: it takes whatever lies past the size read above
            high = (sql.SQL(" AND ctid < {}::tid").format(sql.Literal(f"({bounds[i + 1]},0)"))
                    if i < self.workers - 1 else sql.SQL(""))
            statements.append((head + sql.SQL(" WHERE ") + low + high + sql.SQL(") TO STDOUT")).as_string(conn))
        split = _Split(table, parts=len(statements), left=len(statements))
        with self.cond:
            self.pending[:0] = [_Item([table], statement=s, split=split) for s in statements[1:]]
            self.cond.notify_all()
        return _Item([table], statement=statements[0], split=split)

    def _read(self, item: _Item) -> list[TableChecksum]:
        split = item.split
        if split is None:
            return [t for chunk in bounded([table_pattern(*table) for table in item.tables])
                    for t in digest_dump(self.pg, self.database, chunk)]
        rows, total = digest_copy(self.pg, self.database, item.statement)
        with self.cond:
            split.rows += rows
            split.total = (split.total + total) % (1 << 64)
            split.left -= 1
            if split.left:
                return []
        schema, name = split.table
        found = TableChecksum(schema_name=schema, table=name, rows=split.rows, checksum=f"{METHOD}:{split.total:016x}")
        want = self.expected[split.table]
        if (found.rows, found.checksum) == (want.rows, want.checksum):
            return [found]
        run_logger().warning("%s.%s read back in %d block ranges differs from the backup; reading it again with "
                             "pg_dump", schema, name, split.parts)
        return digest_dump(self.pg, self.database, [table_pattern(schema, name)])

    def abandon(self) -> None:
        """The restore failed: stop reading (a read under way ends when its database is dropped)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def finish(self) -> list[TableChecksum]:
        """Once the restore has ended: read what is left, and the sequences; the whole database's checksums."""
        with self.pg.connect(self.database) as conn:  # the sizes now that the data is in
            sizes = {(schema, name): size for schema, name, kind, size in user_relations(conn) if kind == "r"}
        with self.cond:
            self.tables.update((t, sizes.get(t, 0)) for t in self.tables)
            rest = [_Item([t]) for t in self.tables if t not in self.taken]
            self.taken.update(t for item in rest for t in item.tables)
            self.pending = sorted(self.pending + rest, key=lambda i: (i.split is None, -self.tables[i.tables[0]]))
            self.ended = True
            self.cond.notify_all()
        for thread in self.threads:
            thread.join()
        if self.error is not None:
            raise self.error
        with self.pg.connect(self.database) as conn:
            sequences = [checksum_relation(conn, *rel, None) for rel in self.sequences]
        return sorted([*self.found, *sequences], key=lambda t: (t.schema_name, t.table))
