"""PostgreSQL steps: list databases, dump one database or the globals into the store, restore them and
check them. The per-table checksums live in ``tasks.pg_checksums``, the read-back beside a restore in
``tasks.pg_readback``."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    read_head,
    with_copy_statements,
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
from tasks.pg_checksums import (
    ExitChecked,
    checksum_relation,
    checksums_like,
    collect_checksums,
    compare_checksums,
    rows_only,
    user_relations,
)
from tasks.pg_load import DataLoaders, frozen_copies, pg_restore_failed
from tasks.pg_readback import ReadBack
from tasks.process import describe_exit, pg_tool, run, spawn, tool_version
from tasks.progress import Progress
from tasks.retry import retry_transient
from tasks.staging import StagingProgress
from tasks.stream import CHUNK, compress_into_store, open_decompressed_reader


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
        relations = user_relations(snap_conn) if table_checksums else []
        sequences = [checksum_relation(snap_conn, *rel, None) for rel in relations if rel[2] == "S"]
        log.info("dumping %s into %s", pg.describe(database), key)
        digest = ArchiveDigest() if table_checksums else None
        argv = [pg_dump, "--format=custom", "--compress=0", f"--snapshot={snapshot}", "--no-password"]
        with spawn(argv, env={**pg.libpq_env(database), **CHECKSUM_ENV}) as child:
            source = ExitChecked(child, pg.describe(database), tap=digest)
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
            store.get_client(), key, ExitChecked(child, pg.describe()), level=level, threads=0
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
    staging: StagingProgress | None = None,
) -> RestoredDatabase:
    """Create ``database`` (it must not exist) and restore the dump into it, then compare checksums.

    The database is created with the source's encoding and locale; with ``properties`` it also gets the
    source's owner, privileges, settings, connection limit and comment (their roles must exist: restore the
    globals first), and ``verify`` compares them too. From the store the dump streams into one
    ``pg_restore``; from a ``staged_file`` (see ``stage_part``, checksum already verified) ``pg_restore -j
    jobs`` runs in parallel. With ``staging`` (the part's download under way, see ``stage_part``) the data
    loads while the download goes on (``tasks.pg_load``), then indexes and constraints load from the finished
    file; if that download fails or starts over this raises StagingRestarted, for the caller to wait for the
    download's result and call again with ``staged_file``. On any failure the database this step created is
    dropped again; nothing else is touched.
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
    readback: ReadBack | None = None
    try:
        argv = [pg_tool("pg_restore"), "--exit-on-error", "--no-password",
                f"--dbname={_conninfo_dbname(database)}"]
        read_beside = (verify and jobs > 1
                       and any((t.checksum or "").startswith(f"{ARCHIVE_METHOD}:") for t in part.tables))
        head = staging.wait_for(lambda: staging.head) if staging is not None and jobs > 1 else None
        if staging is not None and head is not None:
            readback = _restore_following(part, pg, database, argv, staging, head, jobs, read_beside, step)
        else:
            if staging is not None:
                staged_file = staging.wait_done().path
            if staged_file is not None and read_beside:
                # Schema first, so the tables are known; then data and indexes in parallel, each table read
                # back as soon as its data is in, on the core the restore leaves idle.
                _run_restore(pg, database, [*argv, "--section=pre-data", staged_file])
                step("schema (pg_restore --section=pre-data)")
                readback = ReadBack(pg, database, jobs, head=_toc_of(staged_file), expected=part.tables)
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
                expected, actual = rows_only(pg, database, part.tables, exc)
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


def _restore_following(part: Part, pg: PostgresConnection, database: str, argv: list[str], staging: StagingProgress,
                       head: ArchiveHead, jobs: int, read_beside: bool,
                       step: Callable[[str], None]) -> ReadBack | None:
    """Schema from the table of contents, data (and the constraints of tables loaded early) by loaders that
    follow the download, then the rest (sequence values, indexes, other constraints, anything the loaders did
    not take) by ``pg_restore -j`` from the finished file."""
    _run_restore(pg, database, [*argv, "--section=pre-data"], stdin=staging.head_bytes)
    step("schema (pg_restore --section=pre-data)")
    readback = ReadBack(pg, database, jobs, head=head, expected=part.tables) if read_beside else None
    head_bytes = with_copy_statements(head, staging.head_bytes, frozen_copies(pg, database, head))
    loaded = set(DataLoaders(pg, database, argv, staging, head, head_bytes, jobs, readback).run())
    step(f"data, then each table's indexes and constraints ({jobs} loaders following the download"
         + ("; tables read back beside)" if readback else ")"))
    staged = staging.wait_done()
    listing = Path(staged.path).with_name(Path(staged.path).name + ".rest.list")
    listing.write_text("".join(f"{dump_id}\n" for dump_id in head.entries if dump_id not in loaded))
    _run_restore(pg, database, [*argv, f"--jobs={jobs}", "--section=data", "--section=post-data", "--verbose",
                                f"--use-list={listing}", staged.path],
                 on_stderr=readback.loaded if readback is not None else None)
    step(f"foreign keys and the rest (pg_restore -j{jobs}" + ("; tables read back beside)" if readback else ")"))
    return readback


def _toc_of(staged_file: str) -> ArchiveHead | None:
    try:
        return read_head(staged_file)
    except (ArchiveFormatError, OSError) as exc:
        run_logger().warning("%s: %s; tables are read back by name as pg_restore reports them", staged_file, exc)
        return None


def _run_restore(pg: PostgresConnection, database: str, argv: list[str],
                 on_stderr: Callable[[str], None] | None = None, stdin: bytes | None = None) -> None:
    with spawn(argv, env=pg.libpq_env(database), stdin=stdin is not None, stdout=False, on_stderr=on_stderr) as child:
        if stdin is not None:
            try:
                child.stdin.write(stdin)
                child.stdin.close()
            except BrokenPipeError:
                pass  # it stopped reading: its exit status says why
        code = child.wait()
    if code != 0:
        raise pg_restore_failed(f"pg_restore into {pg.describe(database)}", child, code)


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
        expected, actual = rows_only(pg, database, part.tables, exc)
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
