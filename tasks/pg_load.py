"""Loading a custom-format dump's data blocks while the dump is still being downloaded.

``pg_restore -j`` needs the whole archive on disk before it starts. Here ``jobs`` loaders follow the
download (``tasks.staging.StagingProgress``) instead: each takes the next data block in the file (or, once
they are on disk, several small ones), starts ``pg_restore --section=data --use-list=<those blocks>`` and
pipes it the archive's table of contents followed by just those blocks, as they arrive. A block is read
once, from the page cache, by ``sendfile``. pg_restore finds the blocks one after another in a stream (its
way with a pipe), so it needs no offsets. When a loader's pg_restore exits 0, its tables are committed
and handed to the read-back: a table is read at once, or, if a primary key or unique constraint is still to
come, once a loader has made it.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from blocks.errors import RestoreFailed
from blocks.postgres import PostgresConnection
from tasks.archive import SECTION_POST_DATA, SECTION_PRE_DATA, ArchiveHead
from tasks.pg_readback import ReadBack
from tasks.process import Child, describe_exit, spawn
from tasks.staging import Block, StagingProgress, StagingRestarted

_GROUP_BYTES = 64 * 1024 * 1024  # blocks already on disk are loaded several to one pg_restore, up to this size


def pg_restore_failed(what: str, child: Child, code: int) -> RestoreFailed:
    """The error for a pg_restore that exited ``code``: its last error lines, else the end of its stderr."""
    errors = [line for line in child.stderr_lines if ": error:" in line or "ERROR" in line]
    detail = "\n".join(errors[-10:]) if errors else child.stderr_tail()
    return RestoreFailed(f"{what} failed ({describe_exit(code)}): {detail[-2000:]}")


_IDENT = r'(?:"(?:[^"]|"")*"|[a-z_][a-z0-9_$]*)'
_COPY = re.compile(rf"COPY ({_IDENT}(?:\.{_IDENT})?) (.*)FROM stdin;\n", re.DOTALL)


def frozen_copies(pg: PostgresConnection, database: str, head: ArchiveHead) -> dict[int, str]:
    """TABLE DATA dump id -> its COPY statement made ``TRUNCATE ONLY t; COPY t ... FROM stdin WITH (FREEZE);``,
    for every table that is a plain table this connection may truncate (not a partitioned root that a
    ``--load-via-partition-root`` dump loads into). Sent as one query, the two run in one transaction, so the
    rows go in frozen and their pages all-visible: no reader (the index builds, the read-back) has to set
    their hint bits, which on a server with data checksums writes every page again and logs it whole.
    The tables were just created by this restore and are empty, and no foreign key points at them yet."""
    found: dict[int, tuple[str, str]] = {}
    for entry in head.entries.values():
        match = _COPY.fullmatch(entry.copy_stmt or "") if entry.desc == "TABLE DATA" else None
        if match is not None:
            found[entry.dump_id] = (match.group(1), entry.copy_stmt or "")
    if not found:
        return {}
    with pg.connect(database) as conn:
        # quote_ident quotes as pg_dump's fmtId does; a name quoted otherwise is simply not found (not frozen).
        rows = conn.execute(
            "SELECT q.target FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, "
            "LATERAL (SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS target) q "
            "WHERE c.relkind = 'r' AND has_table_privilege(c.oid, 'TRUNCATE') AND q.target = ANY(%s)",
            ([target for target, _ in found.values()],)).fetchall()
    plain = {target for (target,) in rows}
    return {dump_id: f"TRUNCATE ONLY {target}; {copy[:-2]} WITH (FREEZE);\n"
            for dump_id, (target, copy) in found.items() if target in plain}


def table_items(head: ArchiveHead) -> dict[int, list[int]]:
    """TABLE DATA dump id -> the post-data items that need that table alone: its indexes, and its constraints
    other than foreign keys (primary key, unique, exclusion), constraints first, in archive order."""
    tables = {e.dump_id: (e.namespace, e.tag) for e in head.entries.values() if e.desc == "TABLE"}
    data_of = {(e.namespace, e.tag): e.dump_id for e in head.entries.values() if e.desc == "TABLE DATA"}
    found: dict[int, list[int]] = {}
    for entry in head.entries.values():
        if entry.section != SECTION_POST_DATA or entry.desc not in ("INDEX", "CONSTRAINT"):
            continue
        needs = [d for d in entry.dependencies if d in head.entries]
        on = {tables[d] for d in needs if d in tables}
        if len(on) != 1 or any(d not in tables and head.entries[d].section != SECTION_PRE_DATA for d in needs):
            continue
        data = data_of.get(on.pop())
        if data is not None:
            found.setdefault(data, []).append(entry.dump_id)
    return {data: sorted(ids, key=lambda i: head.entries[i].desc != "CONSTRAINT") for data, ids in found.items()}


class DataLoaders:
    """``jobs`` loaders over one staging; ``run()`` returns the dump ids restored once every block is in.

    A loader with no block left to take restores a loaded table's own indexes and constraints
    (``table_items``) with ``pg_restore --section=post-data``, on the core the last loads leave idle, so that
    table can also be read back early. Nothing that needs another table's data (a foreign key, say) runs
    before every block is in. With a ``readback``, each loaded table and each item done is handed to it."""

    def __init__(self, pg: PostgresConnection, database: str, argv: list[str], progress: StagingProgress,
                 head: ArchiveHead, head_bytes: bytes, jobs: int, readback: ReadBack | None = None) -> None:
        self.pg, self.database, self.argv = pg, database, argv
        self.progress, self.head, self.head_bytes = progress, head, head_bytes
        self.jobs = max(1, jobs)
        self.readback = readback
        self.table_items = table_items(head)
        self.sizes: dict[int, int] = {}  # a loaded block's size
        self.attempt = progress.attempts
        self.next_start: int | None = head.data_start  # where the next unclaimed block starts, once known
        self.after: int | None = None  # else: the start of the block whose end it is
        self.loaded: list[int] = []
        self.children: list[Child] = []
        self.error: BaseException | None = None
        self.lock = threading.Condition()
        self.loading = 0  # loaders loading data: each may make more table items ready
        self.lists = Path(progress.path).parent

    def run(self) -> list[int]:
        try:
            fd = os.open(self.progress.path, os.O_RDONLY)
        except FileNotFoundError:  # the download failed and removed its file: StagingRestarted says so
            self.progress.wait_for(lambda: None, attempt=self.attempt)
            raise
        try:
            threads = [threading.Thread(target=self._loader, args=(i, fd), daemon=True) for i in range(self.jobs)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            os.close(fd)
        if self.error is not None:
            raise self.error
        return self.loaded

    def _fail(self, exc: BaseException) -> None:
        with self.lock:
            self.error = self.error or exc
            children = list(self.children)
            self.lock.notify_all()
        for child in children:  # the other loaders' pg_restore: nothing more is wanted from them
            if child.proc.poll() is None:
                child.proc.kill()
        with self.progress.cond:
            self.progress.cond.notify_all()

    # ------------------------------------------------------------------------------------------ claiming

    def _claim(self, fd: int) -> list[Block] | None:
        """The next blocks to load (the first may still be arriving), or None when there are no more."""
        progress = self.progress

        def ready() -> list[Block] | bool | None:
            if self.error is not None:
                return False
            if self.next_start is None:
                assert self.after is not None
                done = progress.blocks.get(self.after)
                if done is None:  # once the staging has ended, the blocks left go to the final pg_restore
                    return False if progress.ended else None
                self.next_start, self.after = done.end, None
            start = self.next_start
            header = 2 + self.head.int_size  # block type, then the dump id as an int
            if progress.written < start + header:
                return False if progress.ended and progress.written <= start else None
            claimed = [progress.blocks.get(start) or Block(self._dump_id(fd, start), start, -1)]
            size = claimed[0].end - start
            while claimed[-1].end >= 0 and (following := progress.blocks.get(claimed[-1].end)) is not None \
                    and size + following.end - following.start <= _GROUP_BYTES:
                claimed.append(following)
                size += following.end - following.start
            if claimed[-1].end >= 0:
                self.next_start = claimed[-1].end
            else:
                self.next_start, self.after = None, start
            return claimed

        claimed = progress.wait_for(ready, attempt=self.attempt)
        return claimed if claimed else None

    def _wait_table_items(self) -> list[int]:
        """For a loader with no block left: table items to make, once there are some; empty when no more can
        come (no loader is loading data)."""
        with self.lock:
            while not (ids := self._take_table_items()) and self.loading and self.error is None:
                self.lock.wait()
            return ids

    def _take_table_items(self) -> list[int]:
        """Under the lock: the indexes and constraints of loaded tables still to make (all those of small tables
        together, or one item of a big table), taken; empty when there are none."""
        batch: list[int] = []
        for data in self.loaded:
            items = self.table_items.get(data)
            if not items:
                continue
            if self.sizes.get(data, 0) >= _GROUP_BYTES:
                if not batch:
                    return [items.pop(0)]
                continue
            batch += items
            items.clear()
            if len(batch) >= 200:
                break
        return batch

    def _dump_id(self, fd: int, start: int) -> int:
        data = os.pread(fd, 2 + self.head.int_size, start)
        value = int.from_bytes(data[2:], "little")
        return -value if data[1] else value

    # ------------------------------------------------------------------------------------------- loading

    def _loader(self, index: int, fd: int) -> None:
        try:
            while True:
                claimed = self._claim(fd)
                ids = [block.dump_id for block in claimed] if claimed is not None else self._wait_table_items()
                if not ids:
                    return
                if claimed is not None:
                    with self.lock:
                        self.loading += 1
                self._busy(index, True)
                try:
                    if claimed is not None:
                        self._load(index, fd, claimed)
                    else:
                        self._run(index, ["--section=post-data"], ids, lambda _child: None)
                finally:
                    self._busy(index, False)
                with self.lock:
                    self.loaded += ids
                    for block in claimed or []:
                        ended = self.progress.blocks.get(block.start)
                        self.sizes[block.dump_id] = (ended.end if ended else block.end) - block.start
                    if claimed is not None:
                        self.loading -= 1
                    self.lock.notify_all()
                if self.readback is not None:
                    for dump_id in ids:
                        self.readback.finished(dump_id)
        except BaseException as exc:  # noqa: BLE001 - raised by run(), in the caller's thread
            self._fail(exc)

    def _busy(self, index: int, busy: bool) -> None:
        if self.readback is not None:
            self.readback.loader_busy(index, busy)

    def _load(self, index: int, fd: int, claimed: list[Block]) -> None:
        self._run(index, ["--section=data"], [b.dump_id for b in claimed], lambda child: self._feed(child, fd, claimed))

    def _run(self, index: int, options: list[str], ids: list[int], feed: Callable[[Child], None]) -> None:
        """pg_restore of the items ``ids``, from what ``feed`` writes to its stdin (or the table of contents
        alone)."""
        listing = self.lists / f"load-{os.getpid()}-{index}.list"
        listing.write_text("".join(f"{dump_id}\n" for dump_id in ids))
        argv = [*self.argv, *options, f"--use-list={listing}"]
        with spawn(argv, env=self.pg.libpq_env(self.database), stdin=True, stdout=False) as child:
            with self.lock:
                self.children.append(child)
            try:
                feed(child)
                if not child.stdin.closed:
                    child.stdin.write(self.head_bytes)
                    child.stdin.close()
            except BrokenPipeError:
                pass  # pg_restore stopped reading: its exit status says why
            code = child.wait()
            with self.lock:
                self.children.remove(child)
        if self.error is not None:
            raise self.error
        if code != 0:
            raise pg_restore_failed(f"pg_restore of archive items {ids} into {self.pg.describe(self.database)}",
                                    child, code)

    def _feed(self, child: Child, fd: int, claimed: list[Block]) -> None:
        """The table of contents, then the claimed blocks' bytes as they reach the file."""
        stdin = child.stdin
        assert stdin is not None
        stdin.write(self.head_bytes)
        stdin.flush()
        out = stdin.fileno()
        position = claimed[0].start
        while True:
            found = self.progress.wait_for(lambda at=position: self._available(claimed, at), attempt=self.attempt)
            if self.error is not None:
                raise self.error
            if found is None:  # the scanner that marks block ends stopped: load from the finished file instead
                raise StagingRestarted(f"{self.progress.path}: the end of data block {claimed[0].dump_id} "
                                       "was never found")
            limit, end = found
            while position < limit:
                position += os.sendfile(out, fd, position, limit - position)
            if 0 <= end <= position:  # past it, maybe: while its end was unknown, what had arrived went
                break
        stdin.close()

    def _available(self, claimed: list[Block], position: int) -> tuple[int, int] | None:
        """Under the staging's lock: (how far to send now, the claim's end or -1 while unknown), or None to
        wait for more bytes."""
        if self.error is not None:
            return (position, -1)
        end = claimed[-1].end
        if end < 0:  # a single block still arriving
            done = self.progress.blocks.get(claimed[0].start)
            end = done.end if done is not None else -1
        limit = min(self.progress.written, end) if end >= 0 else self.progress.written
        return (limit, end) if limit > position or 0 <= end <= position else None
