"""``ReadBack``: reads a restored database's tables back with the backup's own scanner while, and after,
``pg_restore`` loads them, for ``restore_database`` to compare with the manifest."""

from __future__ import annotations

import re
import threading
from collections import Counter

from blocks.postgres import PostgresConnection
from tasks.archive import ArchiveHead, locking_items
from tasks.manifest import TableChecksum
from tasks.pg_checksums import bounded, checksum_relation, digest_dump, table_pattern, user_relations

_TABLE_LOADED = re.compile(r"^pg_restore: finished item \d+ TABLE DATA (.+)$")
_ITEM_DONE = re.compile(r"^pg_restore: finished item (\d+) ")


class ReadBack:
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
            relations = user_relations(conn)
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
                found = [t for chunk in bounded([table_pattern(*table) for table in batch])
                         for t in digest_dump(self.pg, self.database, chunk)]
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
            sizes = {(schema, name): size for schema, name, kind, size in user_relations(conn) if kind == "r"}
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
            sequences = [checksum_relation(conn, *rel, None) for rel in self.sequences]
        return sorted([*self.found, *sequences], key=lambda t: (t.schema_name, t.table))
