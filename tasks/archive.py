"""Reading a ``pg_dump -Fc -Z0`` archive while it streams past: table checksums and data-block offsets.

The dump already carries every row as ``COPY`` text, so the checksum costs no second scan of the tables:
the archive's header and table of contents are parsed here, and the data blocks go to a C scanner
(``tasks/_dumpscan.c``) that counts each table's rows and sums an XXH64 hash of each row's text. The sum
is order-independent, so a restore is verified by running the same ``pg_dump`` on the restored database and
comparing (``digest_database``). Both dumps run with the same session settings (``CHECKSUM_ENV``), so the
same rows give the same text. Checksums of this kind are written ``xxh64sum:<16 hex>``.

The same scanner finds where each data block starts. ``pg_dump`` writing to a pipe cannot go back to
record those offsets in its table of contents; ``ArchiveDigest.toc_offsets`` gives the bytes that put
them there in a staged copy, so ``pg_restore -j`` seeks to each table's data instead of reading through
the blocks before it.

The parser knows archive versions ``MIN_VERSION`` to ``MAX_VERSION``; any other raises
``UnsupportedArchive``, and callers fall back to SQL checksums (``h64sum:``, ``tasks.pg_checksums``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tasks._dumpscan import Scanner
from tasks.manifest import TableChecksum

METHOD = "xxh64sum"
# Session settings both dumps (backup and verification) run with. pg_dump fixes DateStyle, IntervalStyle
# and extra_float_digits itself; these are the others that change how a row prints.
CHECKSUM_ENV = {"PGTZ": "UTC", "PGOPTIONS": "-c bytea_output=hex"}
# Archive versions whose table of contents this parser knows (pg_dump 12 to 17 write 1.14 to 1.16).
MIN_VERSION = (1, 12)
MAX_VERSION = (1, 16)
CUSTOM_FORMAT = 1
MAX_HEAD_BYTES = 256 * 1024 * 1024


class ArchiveFormatError(ValueError):
    """The bytes are not a custom-format archive this parser understands."""


class UnsupportedArchive(ArchiveFormatError):
    """A custom-format archive of a version this parser does not know (a newer pg_dump)."""


class _Incomplete(Exception):
    """More bytes are needed to finish the table of contents."""


@dataclass(frozen=True)
class TocEntry:
    dump_id: int
    desc: str
    namespace: str | None
    tag: str | None
    section: int  # SECTION_PRE_DATA, SECTION_DATA, SECTION_POST_DATA, or 1 (none: ACLs, comments, ...)
    dependencies: tuple[int, ...]  # dump ids of the entries this one needs
    offset_at: int  # position in the archive of the entry's data-offset field (flag byte, then the offset)
    copy_stmt: str | None = None  # a TABLE DATA entry's "COPY ... FROM stdin;\n"
    copy_span: tuple[int, int] = (0, 0)  # where that string (its length int, then its bytes) lies in the archive


@dataclass(frozen=True)
class ArchiveHead:
    version: str
    int_size: int
    offset_size: int
    entries: dict[int, TocEntry]
    data_start: int  # position of the first data block


class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.int_size = 4

    def take(self, count: int) -> memoryview:
        if self.pos + count > len(self.data):
            raise _Incomplete
        piece = self.data[self.pos:self.pos + count]
        self.pos += count
        return piece

    def byte(self) -> int:
        return self.take(1)[0]

    def int(self) -> int:
        sign = self.byte()
        value = int.from_bytes(self.take(self.int_size), "little")
        return -value if sign else value

    def str(self) -> str | None:
        length = self.int()
        if length < 0:
            return None
        return bytes(self.take(length)).decode("utf-8", errors="replace")


def parse_head(data: bytes | bytearray | memoryview) -> ArchiveHead:
    """The archive's header and table of contents; raises _Incomplete until ``data`` holds all of it."""
    r = _Reader(data)
    if bytes(r.take(5)) != b"PGDMP":
        raise ArchiveFormatError("not a pg_dump custom-format archive (no PGDMP magic)")
    vmaj, vmin, vrev = r.byte(), r.byte(), r.byte()
    version = (vmaj, vmin)
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise UnsupportedArchive(f"pg_dump archive version {vmaj}.{vmin}.{vrev} is not one this parser knows "
                                 f"({'.'.join(map(str, MIN_VERSION))} to {'.'.join(map(str, MAX_VERSION))})")
    r.int_size = r.byte()
    offset_size = r.byte()
    if not 1 <= r.int_size <= 8 or not 1 <= offset_size <= 16:
        raise ArchiveFormatError(f"implausible archive header (int size {r.int_size}, offset size {offset_size})")
    if r.byte() != CUSTOM_FORMAT:
        raise ArchiveFormatError("not a custom-format archive (pg_dump --format=custom)")
    if version >= (1, 15):
        compression = r.byte()
    else:
        compression = r.int()
    if compression != 0:
        raise ArchiveFormatError("the archive's data is compressed (the dump must use --compress=0)")
    for _ in range(7):  # creation time
        r.int()
    r.str()  # database name
    r.str()  # server version
    r.str()  # pg_dump version
    count = r.int()
    if count < 0:
        raise ArchiveFormatError("negative TOC entry count")
    entries: dict[int, TocEntry] = {}
    for _ in range(count):
        dump_id = r.int()
        if dump_id <= 0:
            raise ArchiveFormatError(f"bad TOC entry id {dump_id}")
        r.int()  # had dumper
        r.str()  # table oid
        r.str()  # oid
        tag = r.str()
        desc = r.str() or ""
        section = r.int()
        r.str()  # definition
        r.str()  # drop statement
        copy_start = r.pos
        copy_stmt = r.str()
        copy_span = (copy_start, r.pos)
        namespace = r.str()
        r.str()  # tablespace
        if version >= (1, 14):
            r.str()  # table access method
        if version >= (1, 16):
            r.int()  # relkind
        r.str()  # owner
        r.str()  # "false": with oids
        dependencies = []
        while (dependency := r.str()) is not None:
            dependencies.append(int(dependency) if dependency.isdigit() else 0)
        offset_at = r.pos
        r.byte()  # data offset flag
        r.take(offset_size)
        entries[dump_id] = TocEntry(dump_id=dump_id, desc=desc, namespace=namespace, tag=tag, section=section,
                                    dependencies=tuple(dependencies), offset_at=offset_at, copy_stmt=copy_stmt,
                                    copy_span=copy_span)
    return ArchiveHead(version=f"{vmaj}.{vmin}.{vrev}", int_size=r.int_size, offset_size=offset_size,
                       entries=entries, data_start=r.pos)


def with_copy_statements(head: ArchiveHead, head_bytes: bytes, statements: dict[int, str]) -> bytes:
    """``head_bytes`` (the archive up to its first data block) with the COPY statements of the TABLE DATA
    entries in ``statements`` (dump id -> new statement) replaced. The data offsets in the result are no
    longer true: it is for a ``pg_restore`` that reads its archive from a pipe, which ignores them."""
    pieces: list[bytes] = []
    at = 0
    for start, end, text in sorted((head.entries[i].copy_span + (text,) for i, text in statements.items())):
        encoded = text.encode()
        pieces += [head_bytes[at:start], b"\x00", len(encoded).to_bytes(head.int_size, "little"), encoded]
        at = end
    pieces.append(head_bytes[at:])
    return b"".join(pieces)


# pg_dump's sections (pg_backup.h).
SECTION_PRE_DATA, SECTION_DATA, SECTION_POST_DATA = 2, 3, 4

# pg_restore's data-offset flags (pg_backup_archiver.h).
_OFFSET_POS_SET = 2


def read_head(path: str) -> ArchiveHead:
    """The header and table of contents of the archive file at ``path``."""
    size = 1024 * 1024
    with open(path, "rb") as f:
        data = f.read(size)
        while True:
            try:
                return parse_head(data)
            except _Incomplete:
                more = f.read(size)
                if not more or len(data) > MAX_HEAD_BYTES:
                    raise ArchiveFormatError(f"{path}: no end of the table of contents") from None
                data += more
                size *= 2


# Post-data items that take an ACCESS EXCLUSIVE lock on their table (ALTER TABLE ... ADD CONSTRAINT, CREATE
# POLICY, ENABLE ROW LEVEL SECURITY): their tags, "<table> <name>" or "<table>", name the table.
LOCKING_ITEMS = {"CONSTRAINT": True, "CHECK CONSTRAINT": True, "POLICY": True, "ROW SECURITY": False}


def locking_items(head: ArchiveHead) -> dict[tuple[str, str], set[int]]:
    """(schema, table) -> dump ids of the post-data items that will lock that table exclusively."""
    tables = {(e.namespace or "", e.tag or "") for e in head.entries.values() if e.desc == "TABLE DATA"}
    found: dict[tuple[str, str], set[int]] = {}
    for entry in head.entries.values():
        if entry.desc not in LOCKING_ITEMS or entry.tag is None:
            continue
        schema = entry.namespace or ""
        for table in {(schema, entry.tag)} if not LOCKING_ITEMS[entry.desc] else {
                (schema, entry.tag[:i]) for i, ch in enumerate(entry.tag) if ch == " "}:
            if table in tables:
                found.setdefault(table, set()).add(entry.dump_id)
    return found


class ArchiveDigest:
    """Feed it the archive's bytes in order; ``checksums()`` at the end gives one entry per table, and
    ``toc_offsets()`` the data-block offsets. ``hash_rows=False`` follows the blocks without hashing rows.

    Memory: the table of contents while it is incomplete, then one offset per data block.
    """

    def __init__(self, *, hash_rows: bool = True, on_head: Callable[[ArchiveHead, bytes], None] | None = None,
                 on_block: Callable[[int, int, int], None] | None = None) -> None:
        self._on_head = on_head  # (table of contents, the archive's bytes up to the first data block), once
        self._on_block = on_block  # (dump id, start, end) of each finished block, in archive positions
        self._head = bytearray()
        self._hash_rows = hash_rows
        self._scanner: Scanner | None = None
        self._toc: ArchiveHead | None = None
        self._entries: dict[int, TocEntry] = {}
        self._results: dict[int, tuple[int, int]] = {}
        self._starts: dict[int, int] = {}
        self.bytes = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.bytes += len(data)
        if self._scanner is not None:
            self._take(self._blocks(data))
            return
        self._head += data
        try:
            self._toc = parse_head(self._head)
        except _Incomplete:
            if len(self._head) > MAX_HEAD_BYTES:
                raise ArchiveFormatError(
                    f"no end of the table of contents in the first {MAX_HEAD_BYTES} bytes"
                ) from None
            return
        self._entries = self._toc.entries
        self._scanner = Scanner(self._toc.int_size, hash_rows=self._hash_rows)
        if self._on_head is not None:
            self._on_head(self._toc, bytes(self._head[:self._toc.data_start]))
        rest = bytes(self._head[self._toc.data_start:])
        self._head = bytearray()
        self._take(self._blocks(rest))

    def _blocks(self, data: bytes | bytearray | memoryview) -> list[tuple[int, int, int, bool, int, int]]:
        assert self._scanner is not None
        try:
            return self._scanner.feed(data)
        except ValueError as exc:  # the C scanner's own complaint about the data blocks
            raise ArchiveFormatError(str(exc)) from None

    def _take(self, finished: list[tuple[int, int, int, bool, int, int]]) -> None:
        for dump_id, rows, total, is_data, start, end in finished:
            self._starts[dump_id] = start
            if is_data:
                self._results[dump_id] = (rows, total)
            if self._on_block is not None:
                assert self._toc is not None
                self._on_block(dump_id, self._toc.data_start + start, self._toc.data_start + end)

    def _complete(self) -> None:
        if self._scanner is None:
            raise ArchiveFormatError(f"the archive ended inside its table of contents ({self.bytes} bytes)")
        if not self._scanner.between_blocks:
            raise ArchiveFormatError(f"the archive ended inside a data block ({self.bytes} bytes)")

    def toc_offsets(self) -> list[tuple[int, bytes]]:
        """(position, bytes) writes that record every data block's offset in the table of contents, as
        ``pg_dump`` does when it writes to a file. Raises if the archive ended mid-way."""
        self._complete()
        assert self._toc is not None
        size, base = self._toc.offset_size, self._toc.data_start
        writes = []
        for dump_id, start in sorted(self._starts.items()):
            entry = self._entries.get(dump_id)
            if entry is None:
                raise ArchiveFormatError(f"a data block for dump id {dump_id}, which the table of contents lacks")
            writes.append((entry.offset_at, bytes([_OFFSET_POS_SET]) + (base + start).to_bytes(size, "little")))
        return writes

    def checksums(self) -> list[TableChecksum]:
        """Every ``TABLE DATA`` entry's rows and checksum; raises if the archive ended mid-way."""
        if not self._hash_rows:
            raise ValueError("this digest follows the blocks only (hash_rows=False)")
        self._complete()
        tables = []
        for dump_id, entry in self._entries.items():
            if entry.desc != "TABLE DATA":
                continue
            if dump_id not in self._results:
                raise ArchiveFormatError(f"no data block for table {entry.namespace}.{entry.tag}")
            rows, total = self._results[dump_id]
            tables.append(TableChecksum(
                schema_name=entry.namespace or "", table=entry.tag or "", rows=rows,
                checksum=f"{METHOD}:{total:016x}",
            ))
        return sorted(tables, key=lambda t: (t.schema_name, t.table))

