"""PostgreSQL integrity checks: each a task that reads the server and returns typed findings; none changes it
(except pg_amcheck's ``--install-missing``, only when the caller allows it).

Corruption comes from ``pg_amcheck`` (heap and B-tree verification, ``--jobs`` connections over every
database at once); the slow-burning risks from the catalogs and statistics views: data checksums and
checksum failures, invalid indexes, transaction ID / multixact wraparound age, sequences near their end,
long and idle transactions, replication slots and WAL archiving, and tables autovacuum has left behind.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from blocks.errors import AmcheckFailed, ConfigurationError, RunbookError
from blocks.postgres import PostgresConnection
from tasks.findings import (
    Check,
    Finding,
    Severity,
    grade,
    pattern_literal,
    qualified,
    remaining_calls,
    sequence_used_fraction,
)
from tasks.log import run_logger
from tasks.process import describe_exit, pg_tool, spawn
from tasks.retry import retry_transient

# The application_name every runbook connection carries (blocks/postgres.py): the runbook's own sessions.
RUNBOOK_APPLICATION = "runbooks"


class Thresholds(BaseModel):
    """When a measured risk becomes a finding. Ages in transactions, sizes in bytes, times in minutes/days."""

    xid_age_warning: int = Field(default=500_000_000, ge=1, description="Database/table XID age: warning.")
    xid_age_critical: int = Field(default=1_000_000_000, ge=1, description="XID age: critical (2^31 stops writes).")
    mxid_age_warning: int = Field(default=500_000_000, ge=1, description="Multixact age: warning.")
    mxid_age_critical: int = Field(default=1_000_000_000, ge=1, description="Multixact age: critical.")
    sequence_used_warning: float = Field(default=0.75, gt=0, le=1, description="Fraction of a sequence used: warning.")
    sequence_used_critical: float = Field(default=0.9, gt=0, le=1, description="Fraction used: critical.")
    long_transaction_minutes: float = Field(default=60, gt=0, description="A transaction running longer: warning.")
    idle_in_transaction_minutes: float = Field(default=30, gt=0, description="Idle in transaction longer: warning.")
    idle_session_minutes: float = Field(default=30, gt=0, description="Idle session longer: info (terminable).")
    slot_retained_wal_warning_bytes: int = Field(default=1 << 30, ge=0, description="WAL a slot holds: warning.")
    slot_retained_wal_critical_bytes: int = Field(default=10 << 30, ge=0, description="WAL a slot holds: critical.")
    stale_min_dead_tuples: int = Field(default=10_000, ge=0, description="Dead tuples before a table can be stale.")
    stale_dead_fraction: float = Field(default=0.2, ge=0, le=1, description="Dead share of the table's tuples.")
    stale_days: float = Field(default=7, ge=0, description="Days since the last (auto)vacuum for a stale table.")
    table_findings_per_database: int = Field(default=20, ge=1, description="At most this many per-table rows.")


class AmcheckOptions(BaseModel):
    """How deep pg_amcheck looks. The default is light: heap pages and B-tree pages, no TOAST pointers."""

    heapallindexed: bool = Field(default=False, description="Check every heap tuple has its index entry (slower).")
    parent_check: bool = Field(default=False, description="B-tree parent/child checks; takes a ShareLock "
                                                          "(blocks writes to each table while it is checked).")
    toast: bool = Field(default=False, description="Follow TOAST pointers and check the TOASTed values.")
    jobs: int = Field(default=2, ge=1, le=64, description="pg_amcheck --jobs: connections checking at once.")


# ------------------------------------------------------------------------------------------- pg_amcheck


def amcheck_argv(binary: str, databases: list[str], options: AmcheckOptions, *, install_missing: bool) -> list[str]:
    """The pg_amcheck command for these databases (each matched exactly, whatever its name holds)."""
    if not databases:
        raise ConfigurationError("pg_amcheck needs at least one database")
    argv = [binary, "--no-password", f"--jobs={options.jobs}"]
    argv += [f"--database={pattern_literal(db)}" for db in databases]
    if install_missing:
        argv.append("--install-missing")
    if options.heapallindexed:
        argv.append("--heapallindexed")
    if options.parent_check:
        argv.append("--parent-check")
    if not options.toast:
        argv.append("--exclude-toast-pointers")
    return argv


_HEADER = re.compile(r'^(heap table|btree index) "(.*)"(?:, block (\d+))?(?:, offset (\d+))?(?:, attribute (\d+))?:$')


@dataclass
class AmcheckProblem:
    """Every complaint pg_amcheck printed about one relation."""

    kind: str  # "heap" or "index"
    database: str
    name: str  # "schema.relation" as pg_amcheck prints it (not quoted)
    messages: list[str]
    blocks: set[int]


def parse_amcheck_output(text: str, databases: list[str]) -> list[AmcheckProblem]:
    """:func:`parse_amcheck_lines` of a whole report."""
    return parse_amcheck_lines(text.splitlines(), databases)


def parse_amcheck_lines(lines: Iterable[str], databases: list[str]) -> list[AmcheckProblem]:
    """pg_amcheck's report, one entry per relation, in the order first seen; memory bounded by the number of
    damaged relations, whatever the number of lines (a badly damaged table prints one per tuple).

    Each complaint is a header line (``heap table "db.schema.rel", block B, offset O:`` or
    ``btree index "db.schema.idx":``) followed by indented message lines. The database is the longest of
    ``databases`` that prefixes the dotted name (names may hold dots themselves).
    """
    problems: dict[tuple[str, str, str], AmcheckProblem] = {}
    current: AmcheckProblem | None = None
    by_length = sorted(databases, key=len, reverse=True)
    for raw in lines:
        line = raw.rstrip("\n")
        match = _HEADER.match(line)
        if match:
            kind = "heap" if match.group(1) == "heap table" else "index"
            full = match.group(2)
            database = next((d for d in by_length if full.startswith(d + ".")), "")
            name = full[len(database) + 1:] if database else full
            key = (kind, database, name)
            current = problems.setdefault(key, AmcheckProblem(kind, database, name, [], set()))
            if match.group(3) is not None:
                current.blocks.add(int(match.group(3)))
            continue
        if current is not None and line.startswith("    ") and line.strip():
            message = line.strip()
            if len(current.messages) < 5 and message not in current.messages:
                current.messages.append(message)
    return list(problems.values())


class _Relation(BaseModel):
    schema_name: str
    name: str
    kind: str
    table: str | None  # schema.table an index belongs to, or the table a TOAST relation belongs to


def _relations_by_printed_name(conn: psycopg.Connection) -> dict[str, _Relation]:
    rows = conn.execute(
        "SELECT n.nspname, c.relname, c.relkind, "
        "       coalesce(tn.nspname || '.' || t.relname, on_.nspname || '.' || o.relname) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "LEFT JOIN pg_index i ON i.indexrelid = c.oid "
        "LEFT JOIN pg_class t ON t.oid = i.indrelid LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace "
        "LEFT JOIN pg_class o ON c.relkind = 't' AND o.reltoastrelid = c.oid "
        "LEFT JOIN pg_namespace on_ ON on_.oid = o.relnamespace "
        "WHERE c.relkind IN ('r', 'm', 't', 'i')"
    ).fetchall()
    return {qualified(s, n): _Relation(schema_name=s, name=n, kind=k, table=t) for s, n, k, t in rows}


def _installed_amcheck(pg: PostgresConnection, databases: list[str]) -> tuple[list[str], list[str]]:
    """(databases with the amcheck extension, databases without it)."""
    have, lack = [], []
    for db in databases:
        with pg.connect(db) as conn:
            found = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'").fetchone()
        (have if found else lack).append(db)
    return have, lack


class AmcheckRun(BaseModel):
    """What one pg_amcheck run checked and found."""

    databases: list[str]
    unchecked: list[str] = Field(default_factory=list, description="Databases without amcheck, not installed.")
    findings: list[Finding]
    seconds: float
    argv: list[str] = Field(description="The command run (no secrets: the password goes by environment).")

    @property
    def clean_databases(self) -> list[str]:
        dirty = {f.database for f in self.findings}
        return [d for d in self.databases if d not in dirty]


@task(retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def check_corruption(pg: PostgresConnection, databases: list[str], options: AmcheckOptions | None = None, *,
                     install_amcheck: bool = False) -> AmcheckRun:
    """Heap and B-tree verification of ``databases`` with one ``pg_amcheck --jobs N`` run.

    The amcheck extension is created in a database that lacks it only with ``install_amcheck``; otherwise
    that database is reported (warning) as not checked. Every corrupt relation is a critical finding.
    """
    log = run_logger()
    options = options or AmcheckOptions()
    started = time.monotonic()
    findings: list[Finding] = []
    targets, unchecked = (list(databases), []) if install_amcheck else _installed_amcheck(pg, databases)
    for db in unchecked:
        findings.append(Finding(
            check=Check.amcheck, database=db, object=db, severity=Severity.warning, kind="not checked",
            detail="the amcheck extension is not installed, so tables and indexes were not verified",
            action="CREATE EXTENSION amcheck in this database, or run with install_amcheck on"))
    argv: list[str] = []
    if targets:
        argv = amcheck_argv(pg_tool("pg_amcheck"), targets, options, install_missing=install_amcheck)
        log.info("pg_amcheck on %s: %s", pg.describe(), targets)
        with spawn(argv, env=pg.libpq_env()) as child:
            problems = parse_amcheck_lines(io.TextIOWrapper(child.stdout, errors="replace"), targets)
            code = child.wait()
        if code not in (0, 2) or (code == 2 and not problems):
            raise AmcheckFailed(f"pg_amcheck on {pg.describe()} failed ({describe_exit(code)}): "
                                f"{child.stderr_tail() or 'no message'}")
        findings += _amcheck_findings(pg, problems)
    seconds = round(time.monotonic() - started, 3)
    log.info("pg_amcheck on %s: %d corrupt relation(s) in %.1f s", pg.describe(),
             sum(f.severity == Severity.critical for f in findings), seconds)
    return AmcheckRun(databases=targets, unchecked=unchecked, findings=findings, seconds=seconds,
                      argv=[a for a in argv])


def _amcheck_findings(pg: PostgresConnection, problems: list[AmcheckProblem]) -> list[Finding]:
    findings = []
    catalogs: dict[str, dict[str, _Relation]] = {}
    for problem in problems:
        if problem.database not in catalogs:
            try:
                with pg.connect(problem.database) as conn:
                    catalogs[problem.database] = _relations_by_printed_name(conn)
            except RunbookError:
                catalogs[problem.database] = {}
        relation = catalogs[problem.database].get(problem.name)
        blocks = sorted(problem.blocks)
        where = f"blocks {', '.join(map(str, blocks[:10]))}{' ...' if len(blocks) > 10 else ''}: " if blocks else ""
        detail = where + " / ".join(problem.messages)
        if problem.kind == "index":
            action = ("REINDEX INDEX CONCURRENTLY (the reindex switch does it) once its table checks clean; "
                      "find the cause (storage, memory, a bug) before trusting the server")
        else:
            action = ("do NOT reindex or vacuum this table: restore it from the newest verified backup or "
                      "PITR to before the damage (see the recovery options); find the cause (storage, memory)")
        findings.append(Finding(
            check=Check.amcheck, database=problem.database, object=problem.name, severity=Severity.critical,
            kind=problem.kind, detail=detail, action=action,
            schema_name=relation.schema_name if relation else None, relation=relation.name if relation else None,
            parent=relation.table if relation else None))
    return findings


# --------------------------------------------------------------------------------- catalogs and statistics


def _each_database(pg: PostgresConnection, databases: Iterable[str]) -> Iterable[tuple[str, psycopg.Connection]]:
    for db in databases:
        with pg.connect(db, autocommit=True) as conn:
            yield db, conn


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def list_databases(pg: PostgresConnection, databases: list[str] | None = None) -> list[str]:
    """The databases to check: those named (each must exist and accept connections), else all that do."""
    with pg.connect() as conn:
        rows = conn.execute("SELECT datname, datallowconn FROM pg_database WHERE NOT datistemplate "
                            "ORDER BY datname").fetchall()
    allowed = [name for name, allow in rows if allow]
    if not databases:
        run_logger().info("checking every database that accepts connections on %s: %s", pg.describe(), allowed)
        return allowed
    missing = [d for d in databases if d not in allowed]
    if missing:
        raise ConfigurationError(f"database(s) {missing} do not exist or refuse connections on {pg.describe()}; "
                                 f"it has {allowed}; nothing was checked")
    return list(dict.fromkeys(databases))


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def check_checksums(pg: PostgresConnection, databases: list[str]) -> list[Finding]:
    """Data checksums on or off (info), and checksum failures PostgreSQL recorded per database (critical)."""
    with pg.connect() as conn:
        enabled = str(conn.execute("SHOW data_checksums").fetchone()[0]) == "on"  # type: ignore[index]
        rows = conn.execute(
            "SELECT coalesce(datname, ''), checksum_failures, checksum_last_failure FROM pg_stat_database "
            "WHERE (datname IS NULL OR datname = ANY(%s)) AND coalesce(checksum_failures, 0) > 0",
            (databases,)).fetchall()
    findings = [Finding(
        check=Check.checksums, database="", object="cluster", severity=Severity.info, kind="setting",
        detail="data checksums are on" if enabled else "data checksums are off: a damaged page is read as if "
               "it were good unless amcheck looks at it",
        action="" if enabled else "enable with pg_checksums --enable while the cluster is stopped (a standby first)")]
    for datname, failures, last in rows:
        findings.append(Finding(
            check=Check.checksums, database=datname, object=datname or "shared catalogs", kind="failures",
            severity=Severity.critical,
            detail=f"{failures} checksum failure(s) recorded, the last at {last:%Y-%m-%d %H:%M:%S %Z}",
            action="find the damaged relation in the server log ('page verification failed'); amcheck results "
                   "below say whether it is still damaged"))
    run_logger().info("checksums on %s: %s, %d database(s) with failures", pg.describe(),
                      "on" if enabled else "off", len(rows))
    return findings


def settle_checksum_failures(findings: list[Finding], amcheck_clean: Iterable[str]) -> list[Finding]:
    """Checksum failures are a counter that never goes down. Where this run's amcheck read every table and
    B-tree index of the database and found nothing, the damage is no longer there (rebuilt, dropped, or
    in a non-B-tree index): such a finding becomes a warning that says so. Pure."""
    clean = set(amcheck_clean)
    out = []
    for finding in findings:
        if finding.check == Check.checksums and finding.kind == "failures" and finding.database in clean:
            finding = finding.model_copy(update={
                "severity": Severity.warning,
                "detail": finding.detail + "; amcheck finds every table and B-tree index of this database "
                                           "intact now",
                "action": "check non-B-tree indexes (REINDEX them) and the server log; the counter resets only "
                          "with pg_stat_reset()"})
        out.append(finding)
    return out


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def check_invalid_indexes(pg: PostgresConnection, databases: list[str]) -> list[Finding]:
    """Indexes left invalid by a failed ``CREATE INDEX CONCURRENTLY`` or ``REINDEX CONCURRENTLY`` (not those
    being built right now)."""
    findings = []
    for db, conn in _each_database(pg, databases):
        rows = conn.execute(
            "SELECT n.nspname, c.relname, tn.nspname, t.relname, i.indisunique, pg_relation_size(c.oid) "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace tn ON tn.oid = t.relnamespace "
            "WHERE NOT (i.indisvalid AND i.indisready) "
            "AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_create_index p WHERE p.index_relid = i.indexrelid "
            "                OR (p.relid = i.indrelid AND p.datid = (SELECT oid FROM pg_database "
            "                                                       WHERE datname = current_database()))) "
            "ORDER BY 1, 2").fetchall()
        for schema, name, tschema, table, unique, size in rows:
            leftover = re.search(r"_cc(new|old)\d*$", name) is not None
            findings.append(Finding(
                check=Check.invalid_indexes, database=db, object=qualified(schema, name), severity=Severity.warning,
                kind="leftover" if leftover else "invalid",
                detail=f"invalid {'unique ' if unique else ''}index on {qualified(tschema, table)} ({size} bytes): "
                       f"not used by queries{', its uniqueness is not enforced' if unique else ''}, still written to",
                action="DROP INDEX CONCURRENTLY (left by a failed REINDEX CONCURRENTLY)" if leftover else
                       "REINDEX INDEX CONCURRENTLY (the reindex switch does it); a unique one fails again until the "
                       "duplicate rows are fixed",
                schema_name=schema, relation=name, parent=qualified(tschema, table)))
    run_logger().info("invalid indexes on %s: %d", pg.describe(), len(findings))
    return findings


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def check_wraparound(pg: PostgresConnection, databases: list[str], thresholds: Thresholds) -> list[Finding]:
    """Transaction ID and multixact age of each database and of its oldest tables, against the thresholds."""
    t = thresholds
    findings = []
    action = ("VACUUM (FREEZE, VERBOSE) the oldest tables; first end whatever holds the xmin horizon back "
              "(long transactions, prepared transactions, stale replication slots)")
    with pg.connect() as conn:
        rows = conn.execute("SELECT datname, age(datfrozenxid), mxid_age(datminmxid) FROM pg_database "
                            "WHERE datname = ANY(%s)", (databases,)).fetchall()
    for db, xid_age, mxid_age in rows:
        findings += _age_findings(db, db, "database", xid_age, mxid_age, t, action)
    for db, conn in _each_database(pg, databases):
        tables = conn.execute(
            "SELECT n.nspname, c.relname, age(c.relfrozenxid), mxid_age(c.relminmxid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'm', 't') "
            "AND (age(c.relfrozenxid) >= %s OR mxid_age(c.relminmxid) >= %s) "
            "ORDER BY greatest(age(c.relfrozenxid)::float / %s, mxid_age(c.relminmxid)::float / %s) DESC LIMIT %s",
            (min(t.xid_age_warning, t.xid_age_critical), min(t.mxid_age_warning, t.mxid_age_critical),
             t.xid_age_critical, t.mxid_age_critical, t.table_findings_per_database)).fetchall()
        for schema, name, xid_age, mxid_age in tables:
            for finding in _age_findings(db, qualified(schema, name), "table", xid_age, mxid_age, t, action):
                findings.append(finding.model_copy(update={"schema_name": schema, "relation": name}))
    run_logger().info("wraparound on %s: %d finding(s)", pg.describe(), len(findings))
    return findings


def _age_findings(db: str, obj: str, kind: str, xid_age: int, mxid_age: int, t: Thresholds,
                  action: str) -> list[Finding]:
    out = []
    for what, age, warning, critical in (("transaction ID", xid_age, t.xid_age_warning, t.xid_age_critical),
                                         ("multixact", mxid_age, t.mxid_age_warning, t.mxid_age_critical)):
        severity = grade(age, warning, critical)
        if severity is not None:
            out.append(Finding(
                check=Check.wraparound, database=db, object=obj, severity=severity, kind=f"{kind} {what}",
                detail=f"{what} age {age:,} of 2,147,483,647 ({age / 2**31:.1%}); thresholds {warning:,} / "
                       f"{critical:,}", action=action))
    return out


_COLUMN_MAX = {"smallint": 2**15 - 1, "integer": 2**31 - 1, "bigint": 2**63 - 1}


def effective_max(sequence_max: int, column_type: str | None) -> int:
    """A sequence feeding an ``integer`` column ends at the column's maximum, whatever its own. Pure."""
    limit = _COLUMN_MAX.get(column_type or "")
    return min(sequence_max, limit) if limit is not None else sequence_max


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def check_sequences(pg: PostgresConnection, databases: list[str], thresholds: Thresholds) -> list[Finding]:
    """Sequences that have used up a large part of their range, by their type, the owning column's type and
    their increment (cycling sequences wrap by design and are left out)."""
    findings = []
    for db, conn in _each_database(pg, databases):
        rows = conn.execute(
            "SELECT s.schemaname, s.sequencename, s.data_type::text, s.last_value, s.min_value, s.max_value, "
            "       s.increment_by, format_type(a.atttypid, NULL), tn.nspname || '.' || t.relname || '.' || a.attname "
            "FROM pg_sequences s "
            "JOIN pg_namespace sn ON sn.nspname = s.schemaname "
            "JOIN pg_class sc ON sc.relnamespace = sn.oid AND sc.relname = s.sequencename "
            "LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = sc.oid "
            "     AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0 "
            "LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid "
            "LEFT JOIN pg_class t ON t.oid = d.refobjid LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace "
            "WHERE NOT s.cycle ORDER BY 1, 2").fetchall()
        for schema, name, seq_type, last, min_value, max_value, increment, column_type, column in rows:
            top = effective_max(max_value, column_type) if increment > 0 else max_value
            used = sequence_used_fraction(last, min_value, top, increment)
            severity = grade(used, thresholds.sequence_used_warning, thresholds.sequence_used_critical)
            if severity is None:
                continue
            left = remaining_calls(last, min_value, top, increment)
            bound = f"{column_type} column {column}" if column and top != max_value else f"{seq_type} sequence"
            findings.append(Finding(
                check=Check.sequences, database=db, object=qualified(schema, name), severity=severity, kind="range",
                detail=f"{used:.1%} used: last value {last:,}, limit {top:,} ({bound}), increment {increment}, "
                       f"{left:,} calls left",
                action="widen the column and the sequence (ALTER ... TYPE bigint; ALTER SEQUENCE ... AS bigint) "
                       "before it runs out",
                schema_name=schema, relation=name))
    run_logger().info("sequences on %s: %d near their end", pg.describe(), len(findings))
    return findings


class SessionRow(BaseModel):
    pid: int
    database: str
    user: str
    application: str
    client: str
    state: str
    xact_seconds: float | None
    state_seconds: float | None
    backend_start: str
    query: str


def _sessions(conn: psycopg.Connection, databases: list[str]) -> list[SessionRow]:
    """Client sessions of other applications in ``databases``: not ours, not replication, not this one."""
    rows = conn.execute(
        "SELECT pid, datname, coalesce(usename, ''), application_name, coalesce(client_addr::text, 'local'), "
        "       coalesce(state, ''), extract(epoch FROM now() - xact_start)::float8, "
        "       extract(epoch FROM now() - state_change)::float8, backend_start::text, left(query, 120) "
        "FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
        "AND datname = ANY(%s) AND application_name <> %s ORDER BY pid",
        (databases, RUNBOOK_APPLICATION)).fetchall()
    return [SessionRow(pid=r[0], database=r[1], user=r[2], application=r[3], client=r[4], state=r[5],
                       xact_seconds=r[6], state_seconds=r[7], backend_start=r[8], query=r[9]) for r in rows]


def session_findings(sessions: list[SessionRow], thresholds: Thresholds) -> list[Finding]:
    """Long transactions and idle / idle-in-transaction sessions over their thresholds. Pure."""
    findings = []
    for s in sessions:
        who = f"pid {s.pid} ({s.user}@{s.client}, application {s.application!r})"
        idle_for = s.state_seconds or 0
        if s.state.startswith("idle in transaction") and idle_for >= thresholds.idle_in_transaction_minutes * 60:
            findings.append(Finding(
                check=Check.sessions, database=s.database, object=who, severity=Severity.warning,
                kind="idle in transaction", pid=s.pid,
                detail=f"{s.state} for {idle_for / 60:.1f} min (transaction open "
                       f"{(s.xact_seconds or 0) / 60:.1f} min); holds locks and the xmin horizon; last query: "
                       f"{s.query}",
                action="fix the application (commit or roll back); terminate with terminate_idle_in_transaction; "
                       "set idle_in_transaction_session_timeout"))
        elif s.state == "active" and (s.xact_seconds or 0) >= thresholds.long_transaction_minutes * 60:
            findings.append(Finding(
                check=Check.sessions, database=s.database, object=who, severity=Severity.warning,
                kind="long transaction", pid=s.pid,
                detail=f"transaction running {s.xact_seconds / 60:.1f} min: {s.query}",  # type: ignore[operator]
                action="check what it waits for (pg_locks); cancel with pg_cancel_backend if it is stuck"))
        elif s.state == "idle" and (s.state_seconds or 0) >= thresholds.idle_session_minutes * 60:
            findings.append(Finding(
                check=Check.sessions, database=s.database, object=who, severity=Severity.info, kind="idle", pid=s.pid,
                detail=f"idle for {s.state_seconds / 60:.1f} min",  # type: ignore[operator]
                action="size the application's pool down or set idle_session_timeout; terminate with "
                       "terminate_idle_sessions"))
    return findings


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def check_sessions(pg: PostgresConnection, databases: list[str], thresholds: Thresholds) -> list[Finding]:
    """Long-running transactions, idle-in-transaction and idle sessions over their thresholds, and prepared
    transactions older than the long-transaction threshold."""
    with pg.connect() as conn:
        sessions = _sessions(conn, databases)
        prepared = conn.execute(
            "SELECT gid, database, owner, extract(epoch FROM now() - prepared)::float8 FROM pg_prepared_xacts "
            "WHERE database = ANY(%s) AND now() - prepared >= make_interval(secs => %s)",
            (databases, thresholds.long_transaction_minutes * 60)).fetchall()
    findings = session_findings(sessions, thresholds)
    for gid, db, owner, seconds in prepared:
        findings.append(Finding(
            check=Check.sessions, database=db, object=f"prepared transaction {gid!r} ({owner})",
            severity=Severity.warning, kind="prepared transaction",
            detail=f"prepared {seconds / 60:.1f} min ago and never committed: holds locks and the xmin horizon",
            action="COMMIT PREPARED or ROLLBACK PREPARED it (ask its transaction manager which)"))
    run_logger().info("sessions on %s: %d session(s) looked at, %d finding(s)", pg.describe(), len(sessions),
                      len(findings))
    return findings


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def check_replication(pg: PostgresConnection, thresholds: Thresholds) -> list[Finding]:
    """Replication slots that are inactive, lost, or hold more WAL than the thresholds; WAL archiving failures."""
    t = thresholds
    findings = []
    with pg.connect() as conn:
        slots = conn.execute(
            "SELECT slot_name, slot_type, coalesce(database, ''), active, coalesce(wal_status, ''), "
            "       coalesce(pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() "
            "                                     ELSE pg_current_wal_lsn() END, restart_lsn), 0)::bigint "
            "FROM pg_replication_slots ORDER BY slot_name").fetchall()
        archiver = conn.execute(
            "SELECT current_setting('archive_mode'), archived_count, failed_count, coalesce(last_failed_wal, ''), "
            "       last_failed_time, last_archived_time FROM pg_stat_archiver").fetchone()
    for name, slot_type, db, active, wal_status, retained in slots:
        severity = grade(retained, t.slot_retained_wal_warning_bytes or None,
                         t.slot_retained_wal_critical_bytes or None)
        if not active and severity is None:
            severity = Severity.warning
        if wal_status == "lost":
            severity = Severity.critical
        if severity is None:
            continue
        findings.append(Finding(
            check=Check.replication, database=db, object=f"slot {name}", severity=severity, kind="slot",
            detail=f"{slot_type} slot, {'active' if active else 'INACTIVE'}, wal_status {wal_status or '-'}, "
                   f"holds {retained / 2**20:,.1f} MiB of WAL",
            action="lost: the consumer must be rebuilt from a new base backup" if wal_status == "lost" else
                   "reconnect its consumer, or drop it with pg_drop_replication_slot if nothing uses it (pg_wal "
                   "grows until then)"))
    assert archiver is not None
    mode, archived, failed, failed_wal, failed_at, archived_at = archiver
    if mode != "off" and failed:
        failing_now = failed_at is not None and (archived_at is None or failed_at > archived_at)
        findings.append(Finding(
            check=Check.replication, database="", object="WAL archiver",
            severity=Severity.critical if failing_now else Severity.info, kind="archiver",
            detail=(f"archiving is failing: {failed} failures, last {failed_wal} at {failed_at}, last success "
                    f"{archived_at or 'never'}") if failing_now else
                   f"{failed} archive failure(s) in the past, archiving works again (last success {archived_at})",
            action="read the server log for archive_command errors and check the store; pg_wal grows until it works"
                   if failing_now else ""))
    run_logger().info("replication on %s: %d slot(s), %d finding(s)", pg.describe(), len(slots), len(findings))
    return findings


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def check_vacuum(pg: PostgresConnection, databases: list[str], thresholds: Thresholds) -> list[Finding]:
    """Tables with many dead tuples that autovacuum has never or not recently vacuumed (or analyzed)."""
    t = thresholds
    findings = []
    for db, conn in _each_database(pg, databases):
        rows = conn.execute(
            "SELECT schemaname, relname, n_live_tup, n_dead_tup, "
            "       extract(epoch FROM now() - greatest(last_vacuum, last_autovacuum))::float8, "
            "       extract(epoch FROM now() - greatest(last_analyze, last_autoanalyze))::float8 "
            "FROM pg_stat_user_tables WHERE n_dead_tup >= %s "
            "AND n_dead_tup >= %s * greatest(n_live_tup + n_dead_tup, 1) "
            "AND (greatest(last_vacuum, last_autovacuum) IS NULL "
            "     OR now() - greatest(last_vacuum, last_autovacuum) >= make_interval(secs => %s)) "
            "ORDER BY n_dead_tup DESC LIMIT %s",
            (max(t.stale_min_dead_tuples, 1), t.stale_dead_fraction, t.stale_days * 86400,
             t.table_findings_per_database)).fetchall()
        for schema, name, live, dead, vacuumed, analyzed in rows:
            findings.append(Finding(
                check=Check.vacuum, database=db, object=qualified(schema, name), severity=Severity.warning,
                kind="stale", schema_name=schema, relation=name,
                detail=f"{dead:,} dead tuples ({dead / max(live + dead, 1):.0%}); vacuumed "
                       f"{_ago(vacuumed)}, analyzed {_ago(analyzed)}",
                action="VACUUM (ANALYZE) it (the vacuum_stale_tables switch does it); check why autovacuum skips "
                       "it (autovacuum_enabled, long transactions, cost limits)"))
    run_logger().info("vacuum on %s: %d stale table(s)", pg.describe(), len(findings))
    return findings


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds / 86400:.1f} days ago" if seconds >= 86400 else f"{seconds / 3600:.1f} h ago"
