"""The dump scanner (tasks/archive.py + tasks/_dumpscan.c): table checksums read off a streamed pg_dump
archive, checked against an independent reading of the same data (pg_restore's SQL script and a pure-Python
XXH64); data-block offsets, checked against the ones pg_dump writes into a file; and the SQL fallback for an
archive version the scanner does not know."""

from __future__ import annotations

import logging
import random
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

import tasks.pg_checksums
import tasks.postgres
from blocks.errors import DumpFailed, VerificationFailed
from blocks.postgres import PostgresConnection
from blocks.store import BackupStore
from tasks._dumpscan import xxh64
from tasks.archive import CHECKSUM_ENV, ArchiveDigest, ArchiveFormatError, UnsupportedArchive, parse_head
from tasks.manifest import TableChecksum
from tasks.pg_checksums import ExitChecked, checksums_like, collect_checksums, compare_checksums, digest_database
from tasks.postgres import dump_database, restore_database
from tasks.process import child_env, pg_tool, spawn
from tasks.scratch import ScratchPostgres
from tasks.store import stage_part
from tasks.stream import open_decompressed_reader

M = 2**64
P1, P2, P3, P4, P5 = (11400714785074694791, 14029467366897019727, 1609587929392839161,
                      9650029242287828579, 2870177450012600261)


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) % M


def _round(acc: int, lane: int) -> int:
    return _rotl((acc + lane * P2) % M, 31) * P1 % M


def xxh64_reference(data: bytes) -> int:
    """XXH64 with seed 0, written from the specification, one shot."""
    n, i = len(data), 0
    if n >= 32:
        v = [(P1 + P2) % M, P2, 0, (-P1) % M]
        while i + 32 <= n:
            for j in range(4):
                v[j] = _round(v[j], int.from_bytes(data[i + 8 * j:i + 8 * j + 8], "little"))
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) % M
        for lane in v:
            h = ((h ^ _round(0, lane)) * P1 + P4) % M
    else:
        h = P5
    h = (h + n) % M
    while i + 8 <= n:
        h = (_rotl(h ^ _round(0, int.from_bytes(data[i:i + 8], "little")), 27) * P1 + P4) % M
        i += 8
    if i + 4 <= n:
        h = (_rotl(h ^ (int.from_bytes(data[i:i + 4], "little") * P1 % M), 23) * P2 + P3) % M
        i += 4
    while i < n:
        h = _rotl(h ^ (data[i] * P5 % M), 11) * P1 % M
        i += 1
    h ^= h >> 33
    h = h * P2 % M
    h ^= h >> 29
    h = h * P3 % M
    return h ^ (h >> 32)


def test_xxh64_matches_the_specification() -> None:
    assert xxh64(b"") == 0xEF46DB3751D8E999 == xxh64_reference(b"")  # published test vectors
    assert xxh64(b"abc") == 0x44BC2CF5AD770999 == xxh64_reference(b"abc")
    rng = random.Random(7)
    for length in [*range(0, 70), 127, 128, 129, 1000, 4099]:
        data = rng.randbytes(length)
        assert xxh64(data) == xxh64_reference(data), length


# --- real archives -----------------------------------------------------------------------------------


def _dump(pg: PostgresConnection, database: str, *extra: str) -> bytes:
    argv = [pg_tool("pg_dump"), "--format=custom", "--no-password", *extra]
    return subprocess.run(argv, env=child_env({**pg.libpq_env(database), **CHECKSUM_ENV}),
                          capture_output=True, check=True).stdout


def _unquote(qualified: str) -> str:
    """A quoted qualified name as pg_restore prints it, unquoted: Odd "Schema".things."""
    parts, current, quoted, i = [], "", False, 0
    while i < len(qualified):
        ch = qualified[i]
        if ch == '"' and quoted and qualified[i + 1:i + 2] == '"':
            current, i = current + '"', i + 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == "." and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
        i += 1
    return ".".join([*parts, current])


def _reference_checksums(archive: bytes, pg: PostgresConnection) -> dict[str, tuple[int, str]]:
    """Per table: rows and checksum from pg_restore's own SQL rendering of the archive's COPY data."""
    script = subprocess.run([pg_tool("pg_restore"), "--data-only", "--file=-"], input=archive,
                            capture_output=True, check=True, env=child_env(pg.libpq_env())).stdout
    result: dict[str, tuple[int, str]] = {}
    lines = iter(script.split(b"\n"))
    for line in lines:
        if line.startswith(b"COPY ") and line.endswith(b" FROM stdin;"):
            name = line[5:].split(b" (")[0].decode()
            rows = total = 0
            for row in lines:
                if row == b"\\.":
                    break
                rows += 1
                total = (total + xxh64_reference(row)) % M
            result[_unquote(name)] = (rows, f"xxh64sum:{total:016x}")
    return result


def _digest(archive: bytes, piece_sizes: list[int] | None = None) -> dict[str, tuple[int, str]]:
    digest = ArchiveDigest()
    if piece_sizes is None:
        digest.feed(archive)
    else:
        rng, pos = random.Random(1), 0
        while pos < len(archive):
            size = rng.choice(piece_sizes)
            digest.feed(memoryview(archive)[pos:pos + size])
            pos += size
    return {f"{t.schema_name}.{t.table}": (t.rows, t.checksum) for t in digest.checksums()}


@pytest.fixture(scope="module")
def sample(pg: ScratchPostgres) -> PostgresConnection:
    """A database with awkward content: NULLs, tabs, newlines and backslashes in text, bytea, jsonb,
    timestamptz, an enum, an empty table, a row of 3 MB, duplicate rows, an odd schema name and a large
    object."""
    conn_info = PostgresConnection.from_url(pg.url)
    name = f"archive_{secrets.token_hex(3)}"
    with conn_info.connect(autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    with conn_info.connect(name, autocommit=True) as conn:
        conn.execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')")
        conn.execute('CREATE SCHEMA "Odd ""Schema"""')
        conn.execute('CREATE TABLE "Odd ""Schema""".things (id int, note text, m mood, at timestamptz, '
                     "doc jsonb, raw bytea, f float8)")
        conn.execute(
            'INSERT INTO "Odd ""Schema""".things SELECT i, CASE WHEN i % 7 = 0 THEN NULL ELSE '
            "E'line\\nbreak\\ttab\\\\slash ' || i END, (ARRAY['sad','ok','happy'])[1 + i % 3]::mood, "
            "'2026-01-01 00:00:00+02'::timestamptz + i * interval '1 minute', "
            "jsonb_build_object('i', i, 'u', 'ü'), decode(md5(i::text), 'hex'), i / 3.0 "
            "FROM generate_series(1, 20000) i"
        )
        conn.execute("CREATE TABLE empty_one (a int)")
        conn.execute("CREATE TABLE dupes (a int)")
        conn.execute("INSERT INTO dupes VALUES (1), (1), (2)")
        conn.execute("CREATE TABLE big_row (b bytea)")
        conn.execute("INSERT INTO big_row VALUES (%s)", (random.Random(3).randbytes(3 * 1024 * 1024),))
        conn.execute("SELECT lo_from_bytea(0, 'a large object: its own kind of data block')")
    return conn_info.model_copy(update={"database": name})


def test_digest_equals_an_independent_reading_of_the_same_archive(sample: PostgresConnection) -> None:
    archive = _dump(sample, sample.database, "--compress=0")
    expected = _reference_checksums(archive, sample)
    assert expected['Odd "Schema".things'][0] == 20000 and expected["public.dupes"][0] == 3
    assert _digest(archive) == expected
    # Bytes arriving in any split (a pipe hands over whatever it has) give the same result.
    assert _digest(archive, [1, 2, 3, 5, 7]) == expected
    assert _digest(archive, [65536, 1 << 20, 13]) == expected
    assert expected["public.empty_one"] == (0, "xxh64sum:0000000000000000")
    one = xxh64_reference(b"1")
    assert expected["public.dupes"][1] == f"xxh64sum:{(2 * one + xxh64_reference(b'2')) % M:016x}"  # twice


def test_checksum_ignores_row_order_and_sees_any_change(sample: PostgresConnection) -> None:
    with sample.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE ordered AS SELECT i, md5(i::text) AS t FROM generate_series(1, 5000) i ORDER BY i")
        conn.execute("CREATE TABLE shuffled AS SELECT * FROM ordered ORDER BY t")
    try:
        sums = _digest(_dump(sample, sample.database, "--compress=0"))
        assert sums["public.ordered"] == sums["public.shuffled"]
        with sample.connect(autocommit=True) as conn:
            conn.execute("UPDATE shuffled SET t = t || ' ' WHERE i = 4321")
        changed = _digest(_dump(sample, sample.database, "--compress=0"))
        assert changed["public.shuffled"][0] == 5000
        assert changed["public.shuffled"][1] != sums["public.ordered"][1]
    finally:
        with sample.connect(autocommit=True) as conn:
            conn.execute("DROP TABLE ordered, shuffled")


def test_digest_of_a_restored_copy_equals_the_dump(
    sample: PostgresConnection, fresh_pg: ScratchPostgres, tmp_path: Path
) -> None:
    archive = _dump(sample, sample.database, "--compress=0")
    (tmp_path / "dump").write_bytes(archive)
    target = PostgresConnection.from_url(fresh_pg.url)
    # A restore server in another time zone must not change the checksums.
    with target.connect(autocommit=True) as admin:
        admin.execute("ALTER SYSTEM SET timezone = 'America/Caracas'")
        admin.execute("SELECT pg_reload_conf()")
        admin.execute("CREATE DATABASE copy TEMPLATE template0")
    subprocess.run([pg_tool("pg_restore"), "--no-password", "--dbname=copy", "--jobs=2", str(tmp_path / "dump")],
                   check=True, capture_output=True, env=child_env(target.libpq_env("copy")))
    have = {f"{t.schema_name}.{t.table}": (t.rows, t.checksum) for t in digest_database(target, "copy")}
    want = _digest(archive)
    assert {k: v for k, v in have.items() if not v[1].startswith("seq:")} == want
    with target.connect("copy", autocommit=True) as conn:
        conn.execute("DELETE FROM dupes WHERE a = 1 AND ctid = (SELECT min(ctid) FROM dupes WHERE a = 1)")
    after = {f"{t.schema_name}.{t.table}": (t.rows, t.checksum) for t in digest_database(target, "copy")}
    assert after["public.dupes"][0] == 2 and after["public.dupes"] != want["public.dupes"]


def test_bad_archives_fail_clearly(sample: PostgresConnection) -> None:
    archive = _dump(sample, sample.database, "--compress=0")
    with pytest.raises(ArchiveFormatError, match="inside a data block"):
        _digest(archive[: len(archive) - 100])
    with pytest.raises(ArchiveFormatError, match="inside its table of contents"):
        _digest(archive[:40])
    with pytest.raises(ArchiveFormatError, match="compressed"):
        _digest(_dump(sample, sample.database, "--compress=1"))
    with pytest.raises(ArchiveFormatError, match="PGDMP"):
        _digest(b"-- plain SQL, not an archive\n")


def test_a_dump_that_is_not_an_archive_fails_the_read(sample: PostgresConnection) -> None:
    # What dump_database sees if the stream is garbage: DumpFailed naming the target, not a wrong checksum.
    with spawn(["/bin/echo", "definitely not a dump"], env={}) as child:
        source = ExitChecked(child, "db at somewhere", tap=ArchiveDigest())
        with pytest.raises(DumpFailed, match="db at somewhere.*PGDMP"):
            source.readinto(memoryview(bytearray(1024)))


def test_verification_uses_the_method_the_manifest_recorded(sample: PostgresConnection) -> None:
    # Sets made before the dump-stream checksums carry SQL ones (h64sum): they verify the old way, in parallel.
    with sample.connect() as conn:
        old_style = collect_checksums(conn)
    assert any((t.checksum or "").startswith("h64sum:") for t in old_style)
    assert compare_checksums(old_style, checksums_like(sample, sample.database, old_style, workers=2)) == []
    new_style = checksums_like(sample, sample.database, [], workers=1)  # nothing recorded: SQL as well
    assert new_style == old_style
    from_dump = _digest(_dump(sample, sample.database, "--compress=0"))
    recorded = [TableChecksum(schema_name=k.split(".")[0], table=k.split(".", 1)[1], rows=r, checksum=c)
                for k, (r, c) in from_dump.items()]
    have = checksums_like(sample, sample.database, recorded)
    assert {t.qualified: t.checksum for t in have if not t.checksum.startswith("seq:")} == \
        {k: c for k, (_r, c) in from_dump.items()}
    recorded[0].rows += 1
    assert compare_checksums(recorded, have) == [f"{recorded[0].qualified}: {recorded[0].rows - 1} rows, "
                                                 f"backup had {recorded[0].rows}"]


# --- data-block offsets (stage_part) and archives of a version the scanner does not know --------------


def test_offsets_found_in_a_piped_dump_are_the_ones_pg_dump_writes_into_a_file(
    sample: PostgresConnection, tmp_path: Path
) -> None:
    piped = _dump(sample, sample.database, "--compress=0")  # to a pipe: pg_dump cannot record offsets
    on_file = tmp_path / "file.dump"
    subprocess.run([pg_tool("pg_dump"), "--format=custom", "--compress=0", "--no-password", f"--file={on_file}"],
                   env=child_env({**sample.libpq_env(sample.database), **CHECKSUM_ENV}), check=True)
    written = on_file.read_bytes()
    head = parse_head(written)
    scan = ArchiveDigest(hash_rows=False)
    rng, pos = random.Random(5), 0
    while pos < len(piped):
        size = rng.choice([1, 3, 4096, 1 << 20])
        scan.feed(memoryview(piped)[pos:pos + size])
        pos += size
    writes = scan.toc_offsets()
    field = 1 + head.offset_size
    data_entries = [e for e in head.entries.values() if written[e.offset_at] != 3]  # 3: the entry has no data
    assert len(writes) == len(data_entries) >= 5  # four tables and the large objects
    for position, data in writes:
        assert piped[position] == 1  # "not set" in the piped dump
        assert data == written[position:position + field]  # what pg_dump wrote when it could seek back
    with pytest.raises(ValueError, match="hash_rows=False"):
        scan.checksums()


def test_a_staged_dump_gets_its_offsets_and_restores_in_parallel(
    sample: PostgresConnection, fresh_pg: ScratchPostgres, tmp_path: Path
) -> None:
    store = BackupStore(backend="local", path=str(tmp_path / "store"))
    part = dump_database.fn(sample, sample.database, store, "20260101T000000Z-abc123")
    staged = stage_part.fn(part, store, str(tmp_path / "staging"))
    archive = Path(staged.path).read_bytes()
    head = parse_head(archive)
    assert staged.data_offsets == len([e for e in head.entries.values() if archive[e.offset_at] == 2]) >= 5
    assert {e.desc for e in head.entries.values() if archive[e.offset_at] == 2} == {"TABLE DATA", "BLOBS"}
    assert all(archive[e.offset_at] in (2, 3) for e in head.entries.values())  # every data entry has its offset
    target = PostgresConnection.from_url(fresh_pg.url)
    restored = restore_database.fn(part, store, target, "staged_copy", staged_file=staged.path, jobs=2)
    assert restored.tables == len([t for t in part.tables if not (t.checksum or "").startswith("seq:")]) >= 4


def _renumbering_pg_dump(tmp_path: Path, minor: int) -> str:
    """A pg_dump that writes archive version 1.<minor>: the real one, with the header's version bytes changed."""
    script = tmp_path / "pg_dump"
    script.write_text(
        f"#!{sys.executable}\n"
        "import shutil, subprocess, sys\n"
        f"child = subprocess.Popen([{pg_tool('pg_dump')!r}, *sys.argv[1:]], stdout=subprocess.PIPE)\n"
        "head = child.stdout.read(7)\n"
        f"if head[:5] == b'PGDMP':\n    head = head[:5] + bytes([1, {minor}])\n"
        "sys.stdout.buffer.write(head)\n"
        "shutil.copyfileobj(child.stdout, sys.stdout.buffer)\n"
        "sys.stdout.buffer.flush()\n"
        "sys.exit(child.wait())\n")
    script.chmod(0o755)
    return str(script)


def test_an_unknown_archive_version_is_refused_by_the_scanner(sample: PostgresConnection) -> None:
    archive = bytearray(_dump(sample, sample.database, "--compress=0"))
    archive[6] = 99
    with pytest.raises(UnsupportedArchive, match=r"version 1\.99\.\d+ is not one this parser knows"):
        _digest(bytes(archive))


def test_a_pg_dump_writing_an_unknown_archive_version_still_backs_up_with_sql_checksums(
    sample: PostgresConnection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = _renumbering_pg_dump(tmp_path, 99)
    real_tool = tasks.postgres.pg_tool
    monkeypatch.setattr(tasks.postgres, "pg_tool", lambda name: fake if name == "pg_dump" else real_tool(name))
    store = BackupStore(backend="local", path=str(tmp_path / "store"))
    with caplog.at_level(logging.WARNING, logger="runbooks"):
        part = dump_database.fn(sample, sample.database, store, "20260101T000000Z-abc123")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("by SQL" in w and "1.99" in w for w in warnings), warnings
    with sample.connect() as conn:
        by_sql = collect_checksums(conn)
    assert part.tables == by_sql
    tables = [t for t in part.tables if not (t.checksum or "").startswith("seq:")]
    assert len(tables) >= 4 and all((t.checksum or "").startswith("h64sum:") for t in tables)
    with open_decompressed_reader(store.get_client(), part.key, sha256=part.sha256, size=part.size) as src:
        assert src.read(7)[5:] == bytes([1, 99])  # the stored dump is the one that pg_dump wrote
    # and the manifest's SQL checksums verify a restored copy the SQL way
    assert compare_checksums(part.tables, checksums_like(sample, sample.database, part.tables)) == []


def test_a_local_pg_dump_writing_an_unknown_version_verifies_a_restore_by_row_counts(
    sample: PostgresConnection, fresh_pg: ScratchPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = BackupStore(backend="local", path=str(tmp_path / "store"))
    part = dump_database.fn(sample, sample.database, store, "20260101T000000Z-abc123")  # xxh64sum checksums
    fake = _renumbering_pg_dump(tmp_path, 99)  # the restoring machine's pg_dump is newer than the scanner
    real_tool = tasks.pg_checksums.pg_tool
    monkeypatch.setattr(tasks.pg_checksums, "pg_tool", lambda name: fake if name == "pg_dump" else real_tool(name))
    target = PostgresConnection.from_url(fresh_pg.url)
    with caplog.at_level(logging.WARNING, logger="runbooks"):
        restored = restore_database.fn(part, store, target, "rows_only")
    assert restored.tables >= 4
    assert any("row counts" in r.getMessage() and "1.99" in r.getMessage() for r in caplog.records)
    bad = part.model_copy(deep=True)
    table = next(t for t in bad.tables if t.table == "dupes")
    table.rows += 1
    with pytest.raises(VerificationFailed, match="public.dupes: 3 rows, backup had 4"):
        restore_database.fn(bad, store, target, "rows_only_2")


def test_tables_of_equal_size_are_spread_over_the_readers_and_none_reads_the_whole_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[list[str] | None] = []
    monkeypatch.setattr(tasks.pg_checksums, "digest_dump", lambda _pg, _db, patterns: calls.append(patterns) or [])
    tables = [("public", name, 0) for name in ("a", "b", "c")]  # sizes as a just-created table has them
    tasks.pg_checksums._digest_tables(None, "db", tables, 2, whole=False)  # type: ignore[arg-type]
    assert sorted(len(c or []) for c in calls) == [1, 2]  # two readers, no empty --table list (= every table)
    calls.clear()
    tasks.pg_checksums._digest_tables(None, "db", tables[:1], 2, whole=False)  # type: ignore[arg-type]
    assert calls == [['"public"."a"']]
