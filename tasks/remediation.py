"""The changes db-integrity-check makes when a switch asks for them, each one reporting before and after.

- ``reindex_index``: ``REINDEX INDEX CONCURRENTLY`` of an index amcheck flagged or that is invalid. A failed
  concurrent reindex leaves an invalid ``<name>_ccnew`` index behind; its undo (registered before the
  REINDEX) drops that copy, so the index is left exactly as it was.
- ``terminate_sessions``: ``pg_terminate_backend`` of sessions still over their threshold at that moment,
  never the runbook's own (application_name ``runbooks``), replication connections or excluded applications.
- ``vacuum_table``: ``VACUUM (ANALYZE)`` of a stale table.

Heap corruption has no remediation here: rebuilding anything from damaged rows would make the damage look
like data. It is reported with the newest verified backup and the PITR options (``recovery_options``).
"""

from __future__ import annotations

import re
import time

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from blocks.errors import RunbookError
from blocks.postgres import PostgresConnection
from blocks.store import BackupStore
from tasks.findings import Finding, Remediation, qualified
from tasks.integrity import RUNBOOK_APPLICATION
from tasks.log import run_logger
from tasks.undo import UndoStack


def _index_state(conn: psycopg.Connection, schema: str, name: str) -> str:
    row = conn.execute(
        "SELECT i.indisvalid, i.indisready, pg_relation_size(c.oid), c.relfilenode FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s", (schema, name)).fetchone()
    if row is None:
        return "absent"
    valid, ready, size, filenode = row
    return f"{'valid' if valid and ready else 'INVALID'}, {size} bytes, filenode {filenode}"


def _amcheck_index(conn: psycopg.Connection, schema: str, name: str) -> str:
    """bt_index_check of the index when the amcheck extension is there ('' when it is not)."""
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'").fetchone() is None:
        return ""
    try:
        conn.execute("SELECT bt_index_check(%s::regclass)", (qualified_ident(schema, name),))
    except psycopg.Error as exc:
        return f"; amcheck: {pg_error(exc)}"
    return "; amcheck: ok"


def pg_error(exc: BaseException) -> str:
    """One line from a server error: its message and DETAIL (a duplicate key names the key)."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if primary:
        detail = getattr(diag, "message_detail", None)
        return f"{primary}: {detail}" if detail else primary
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def qualified_ident(schema: str, name: str) -> str:
    """``"schema"."name"`` for a regclass cast."""
    return sql.Identifier(schema, name).as_string(None)


def _drop_leftover_copies(pg: PostgresConnection, database: str, schema: str, name: str) -> list[str]:
    """Drop the invalid ``<name>_ccnew[N]`` copies a failed REINDEX CONCURRENTLY left (the undo of a reindex)."""
    dropped = []
    with pg.connect(database, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND NOT i.indisvalid",
            (schema,)).fetchall()
        copy = re.compile(re.escape(name) + r"_ccnew\d*")
        rows = [row for row in rows if copy.fullmatch(row[0])]
        for (leftover,) in rows:
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(schema, leftover)))
            dropped.append(leftover)
    if dropped:
        run_logger().warning("dropped the copies a failed reindex left: %s", dropped)
    return dropped


@task(cache_policy=NO_CACHE, task_run_name="reindex-{finding.database}-{finding.object}")
def reindex_index(pg: PostgresConnection, finding: Finding) -> Remediation:
    """``REINDEX INDEX CONCURRENTLY`` of the index a finding names; the index is rebuilt from its table or,
    on failure, left as it was (the half-built copy dropped)."""
    assert finding.schema_name and finding.relation, "only findings that name an index can be reindexed"
    schema, name, db = finding.schema_name, finding.relation, finding.database
    action = "REINDEX INDEX CONCURRENTLY"
    with pg.connect(db, autocommit=True) as conn:
        before = _index_state(conn, schema, name)
    if before == "absent":
        return Remediation(action=action, database=db, object=finding.object, before=before, after=before,
                           ok=False, error="the index no longer exists")
    started = time.monotonic()
    error = ""
    undo = UndoStack()
    try:
        with undo, pg.connect(db, autocommit=True) as conn:
            undo.register(f"drop what REINDEX CONCURRENTLY of {finding.object} left half-built",
                          lambda: _drop_leftover_copies(pg, db, schema, name))
            conn.execute(sql.SQL("REINDEX INDEX CONCURRENTLY {}").format(sql.Identifier(schema, name)))
    except (psycopg.Error, RunbookError) as exc:
        error = pg_error(exc)
        if not undo.whole:
            error += "; could not drop the half-built copy: " + "; ".join(o.error for o in undo.outcomes if not o.ok)
    with pg.connect(db, autocommit=True) as conn:
        after = _index_state(conn, schema, name) + _amcheck_index(conn, schema, name)
    ok = not error and after.startswith("valid") and ("amcheck:" not in after or after.endswith("amcheck: ok"))
    run_logger().info("%s %s in %s: %s (%.1f s)", action, finding.object, pg.describe(db),
                      "rebuilt" if ok else f"FAILED: {error or after}", time.monotonic() - started)
    return Remediation(action=action, database=db, object=finding.object, before=before, after=after, ok=ok,
                       error=error)


@task(cache_policy=NO_CACHE)
def terminate_sessions(pg: PostgresConnection, findings: list[Finding], *, states: list[str], min_seconds: float,
                       exclude_applications: list[str]) -> list[Remediation]:
    """End the sessions these findings name if, at this moment, they are still in one of ``states`` for at
    least ``min_seconds``. The runbook's own sessions (application ``runbooks``),
    this connection, non-client backends (replication, autovacuum) and ``exclude_applications`` are never
    touched, whatever the findings say."""
    pids = sorted({f.pid for f in findings if f.pid is not None})
    if not pids:
        return []
    excluded = sorted({RUNBOOK_APPLICATION, *exclude_applications})
    with pg.connect(autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, datname, state, application_name, "
            "       CASE WHEN pg_terminate_backend(pid) THEN 'terminated' ELSE 'not terminated' END "
            "FROM pg_stat_activity WHERE pid = ANY(%s) AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend' AND application_name <> ALL(%s) "
            "AND state = ANY(%s) AND now() - state_change >= make_interval(secs => %s)",
            (pids, excluded, states, min_seconds)).fetchall()
        done = {pid: (db, state, app, outcome) for pid, db, state, app, outcome in rows}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            alive = {r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)",
                                                (list(done),)).fetchall()}
            if not alive:
                break
            time.sleep(0.05)
        current = {r[0]: r[1] for r in conn.execute(
            "SELECT pid, coalesce(state, '') FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchall()}
    out = []
    for finding in findings:
        if finding.pid is None:
            continue
        if finding.pid in done:
            db, state, _app, outcome = done[finding.pid]
            gone = finding.pid not in current
            out.append(Remediation(action="pg_terminate_backend", database=db, object=finding.object, before=state,
                                   after="session ended" if gone else f"still there ({outcome})", ok=gone))
        else:
            now = current.get(finding.pid)
            out.append(Remediation(
                action="pg_terminate_backend", database=finding.database, object=finding.object,
                before=finding.kind, after="left alone: " + ("gone already" if now is None else
                                                              f"now {now or 'not eligible'}, or excluded"),
                ok=True))
    run_logger().info("terminated %d of %d %s session(s) on %s", sum(1 for r in rows if r[4] == "terminated"),
                      len(pids), "/".join(states), pg.describe())
    return out


def _table_state(conn: psycopg.Connection, schema: str, name: str) -> str:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT n_live_tup, n_dead_tup, greatest(last_vacuum, last_autovacuum), "
        "       greatest(last_analyze, last_autoanalyze) FROM pg_stat_user_tables "
        "WHERE schemaname = %s AND relname = %s", (schema, name)).fetchone()
    if row is None:
        return "absent"
    live, dead, vacuumed, analyzed = row
    return (f"{dead} dead / {live} live tuples, vacuumed {vacuumed or 'never'}, analyzed {analyzed or 'never'}")


@task(cache_policy=NO_CACHE, task_run_name="vacuum-{finding.database}-{finding.object}")
def vacuum_table(pg: PostgresConnection, finding: Finding) -> Remediation:
    """``VACUUM (ANALYZE)`` of the stale table a finding names (never FULL: no exclusive lock)."""
    assert finding.schema_name and finding.relation, "only findings that name a table can be vacuumed"
    schema, name, db = finding.schema_name, finding.relation, finding.database
    error = ""
    with pg.connect(db, autocommit=True) as conn:
        before = _table_state(conn, schema, name)
        try:
            conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(schema, name)))
        except psycopg.Error as exc:
            error = pg_error(exc)
        after = before
        deadline = time.monotonic() + 5
        while not error and time.monotonic() < deadline:  # the statistics of the VACUUM arrive a moment later
            after = _table_state(conn, schema, name)
            if after != before:
                break
            time.sleep(0.1)
    run_logger().info("VACUUM (ANALYZE) %s in %s: %s", finding.object, pg.describe(db), error or "done")
    return Remediation(action="VACUUM (ANALYZE)", database=db, object=finding.object, before=before, after=after,
                       ok=not error, error=error)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def recovery_options(store: BackupStore | None, heap_findings: list[Finding]) -> str:
    """What to restore from when table data is damaged: the newest verified backup set and the PITR choices."""
    from tasks.pitr.planning import base_backups
    from tasks.store import find_set, read_verification

    tables = ", ".join(f"`{f.database}`: `{f.object}`" for f in heap_findings)
    lines = [f"Damaged table data (never rebuilt by this runbook): {tables}.", ""]
    if store is None:
        lines.append("No backup store was given: run again with `store` to see which backup set to restore.")
    else:
        client = store.get_client()
        try:
            manifest = find_set(client, "latest", prefer_verified=True)
        except RunbookError as exc:
            lines.append(f"No backup set to restore from: {exc}.")
        else:
            record = read_verification(client, manifest.set_id)
            verified = (f"verified by a restore drill at {record.verified_at:%Y-%m-%d %H:%M} UTC"
                        if record is not None and record.ok else "NOT verified by a restore drill")
            lines.append(f"- Newest backup set: `{manifest.set_id}` (completed {manifest.completed_at:%Y-%m-%d %H:%M} "
                         f"UTC, {verified}). `restore-set` it into new databases beside production, compare, and "
                         "copy the damaged tables' rows back; or `disaster-recovery` for whole databases.")
        bases = base_backups(client)
        if bases:
            newest = bases[-1]
            lines.append(f"- Point-in-time recovery: {len(bases)} base backup(s), the newest `{newest.set_id}`. "
                         "`pitr-restore` a NEW cluster to a time just before the damage was first seen, then copy "
                         "the tables back.")
        else:
            lines.append("- Point-in-time recovery: no base backup in this store (`pitr-base-backup` makes them).")
    lines += ["", "Find the cause first (disk, memory, controller, kernel log): a restore onto the same faulty "
              "storage is damaged again."]
    return "\n".join(lines)


def _damaged_tables(findings: list[Finding]) -> set[tuple[str, str]]:
    return {(f.database, qualified(f.schema_name, f.relation)) for f in findings
            if f.check == "amcheck" and f.kind == "heap" and f.schema_name and f.relation}


def tables_to_vacuum(findings: list[Finding]) -> tuple[list[Finding], list[Finding]]:
    """(stale-table findings to VACUUM, those skipped because the table's heap is damaged). Pure.

    VACUUM prunes and freezes by the very tuple headers that damage garbles: it could remove rows a restore
    still needs to compare against.
    """
    damaged = _damaged_tables(findings)
    stale = [f for f in findings if f.check == "vacuum" and f.kind == "stale" and f.schema_name and f.relation]
    return ([f for f in stale if (f.database, f.object) not in damaged],
            [f for f in stale if (f.database, f.object) in damaged])


def indexes_to_reindex(findings: list[Finding]) -> tuple[list[Finding], list[Finding]]:
    """(index findings to reindex, index findings skipped because their table's heap is damaged). Pure.

    amcheck-flagged B-tree indexes and invalid indexes qualify; a leftover ``_ccnew`` copy does not (it is
    dropped, not rebuilt), and neither does any index of a table with heap corruption: its rebuild would
    read the damaged rows.
    """
    damaged_tables = _damaged_tables(findings)
    chosen: dict[tuple[str, str, str], Finding] = {}
    skipped = []
    for f in findings:
        wanted = (f.check == "amcheck" and f.kind == "index") or (f.check == "invalid_indexes" and f.kind == "invalid")
        if not wanted or not f.schema_name or not f.relation:
            continue
        if (f.database, f.parent or "") in damaged_tables:
            skipped.append(f)
            continue
        chosen.setdefault((f.database, f.schema_name, f.relation), f)
    return list(chosen.values()), skipped
