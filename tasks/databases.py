"""Database-level PostgreSQL steps of a recovery: the properties a database has beyond its contents,
names for copies restored beside, the pre-flight of the renames, and the renames that swap restored
copies in (all in one transaction) and back out again.

Renames run from a *maintenance database* that is not among the databases renamed: PostgreSQL cannot
rename, or refuse connections to, the database a session is connected to, and the default connection
names ``postgres``, which a full backup holds too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from blocks.errors import ConfigurationError, PreflightFailed, RestoreFailed
from blocks.postgres import PostgresConnection
from tasks.log import run_logger
from tasks.manifest import DatabaseProperties, RoleSettings
from tasks.retry import retry_transient

_MAX_IDENT = 63  # NAMEDATALEN - 1, in bytes

# Settings whose value is a list that pg_db_role_setting stores with each element quoted (GUC_LIST_QUOTE):
# they are set again element by element, as pg_dump does.
_LIST_SETTINGS = {"search_path", "temp_tablespaces", "session_preload_libraries", "shared_preload_libraries",
                  "local_preload_libraries", "unix_socket_directories"}


def side_name(database: str, label: str) -> str:
    """``<database>__<label>`` cut to PostgreSQL's 63-byte identifier limit (the label is kept whole)."""
    suffix = f"__{label}"
    room = _MAX_IDENT - len(suffix.encode())
    if room < 1:
        raise ConfigurationError(f"label {label!r} is too long for a database name")
    head = database.encode()[:room].decode(errors="ignore")
    return head + suffix


# ------------------------------------------------------------------------------------------ properties


def read_properties(conn: psycopg.Connection, database: str) -> DatabaseProperties:
    """The properties of ``database`` as the catalogs hold them (any database of the server)."""
    modern = conn.info.server_version >= 170000  # PostgreSQL 17 renamed daticulocale to datlocale
    row = conn.execute(sql.SQL(
        "SELECT pg_encoding_to_char(d.encoding), d.datcollate, d.datctype, d.datlocprovider::text, {}, "
        "pg_get_userbyid(d.datdba), d.datacl IS NULL, d.datconnlimit, shobj_description(d.oid, 'pg_database') "
        "FROM pg_database d WHERE d.datname = %s").format(sql.SQL("d.datlocale" if modern else "d.daticulocale")),
        (database,)).fetchone()
    if row is None:
        raise ConfigurationError(f"database {database!r} does not exist")
    encoding, collate, ctype, provider, icu, owner, default_acl, limit, comment = row
    acl = None if default_acl else [
        _acl_text(grantee, privilege, grantable, grantor) for grantor, grantee, privilege, grantable in conn.execute(
            "SELECT CASE WHEN a.grantor = 0 THEN '' ELSE pg_get_userbyid(a.grantor) END, "
            "CASE WHEN a.grantee = 0 THEN '' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type, a.is_grantable "
            "FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = %s", (database,))]
    settings = [RoleSettings(role=role, settings=list(config)) for role, config in conn.execute(
        "SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END, s.setconfig "
        "FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = %s "
        "ORDER BY 1 NULLS FIRST", (database,))]
    return DatabaseProperties(
        encoding=encoding, collate=collate, ctype=ctype, locale_provider="icu" if provider == "i" else "libc",
        icu_locale=icu, owner=owner, acl=sorted(acl) if acl is not None else None, connection_limit=limit,
        comment=comment, settings=settings)


def _acl_text(grantee: str, privilege: str, grantable: bool, grantor: str) -> str:
    """One privilege as ``grantee:PRIVILEGE[*]:grantor`` (grantee '' is PUBLIC): sortable, comparable."""
    return f"{grantee}:{privilege}{'*' if grantable else ''}:{grantor}"


def _split_acl(text: str) -> tuple[str, str, bool, str]:
    grantor_sep = text.rindex(":")
    grantee_privilege, grantor = text[:grantor_sep], text[grantor_sep + 1:]
    grantee, privilege = grantee_privilege.rsplit(":", 1)
    return grantee, privilege.rstrip("*"), privilege.endswith("*"), grantor


def roles_named(props: DatabaseProperties) -> set[str]:
    """Every role the properties refer to: they must exist before the properties can be applied."""
    roles = {props.owner}
    for item in props.acl or []:
        grantee, _privilege, _grantable, grantor = _split_acl(item)
        roles |= {r for r in (grantee, grantor) if r}
    roles |= {s.role for s in props.settings if s.role}
    return roles


def create_statement(name: str, props: DatabaseProperties | None) -> sql.Composed:
    """``CREATE DATABASE`` of a copy with the source's encoding and locale (from template0)."""
    parts = [sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))]
    if props is not None:
        parts.append(sql.SQL("ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
            sql.Literal(props.encoding), sql.Literal(props.collate), sql.Literal(props.ctype)))
        if props.locale_provider == "icu":
            parts.append(sql.SQL("LOCALE_PROVIDER icu ICU_LOCALE {}").format(sql.Literal(props.icu_locale or "")))
    return sql.SQL(" ").join(parts)


def _setting_value(name: str, value: str) -> sql.Composable:
    if name.lower() not in _LIST_SETTINGS:
        return sql.Literal(value)
    items, current, quoted, i = [], "", False, 0
    while i < len(value):
        ch = value[i]
        if ch == '"':
            if quoted and value[i + 1:i + 2] == '"':
                current += '"'
                i += 1
            else:
                quoted = not quoted
        elif ch == "," and not quoted:
            items.append(current.strip())
            current = ""
        else:
            current += ch
        i += 1
    items.append(current.strip())
    return sql.SQL(", ").join(sql.Literal(item) for item in items)


def apply_statements(name: str, props: DatabaseProperties) -> list[sql.Composed]:
    """Statements that give database ``name`` (owned by anyone) the recorded owner, privileges, connection
    limit, comment and settings. Run as a superuser, or a member of every role they name."""
    db = sql.Identifier(name)
    statements = [sql.SQL("ALTER DATABASE {} OWNER TO {}").format(db, sql.Identifier(props.owner)),
                  sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(db, sql.Literal(props.connection_limit)),
                  sql.SQL("COMMENT ON DATABASE {} IS {}").format(db, sql.Literal(props.comment))]
    if props.acl is not None:
        statements += [sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db),
                       sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(db, sql.Identifier(props.owner))]
        for item in props.acl:
            grantee, privilege, grantable, grantor = _split_acl(item)
            grant = sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                sql.SQL(privilege), db, sql.Identifier(grantee) if grantee else sql.SQL("PUBLIC"),
                sql.SQL(" WITH GRANT OPTION") if grantable else sql.SQL(""))
            if grantor and grantor != props.owner:  # the privilege was granted by someone else: as them
                statements += [sql.SQL("SET ROLE {}").format(sql.Identifier(grantor)), grant, sql.SQL("RESET ROLE")]
            else:
                statements.append(grant)
    for entry in props.settings:
        target = (sql.SQL("ALTER ROLE {} IN DATABASE {}").format(sql.Identifier(entry.role), db) if entry.role
                  else sql.SQL("ALTER DATABASE {}").format(db))
        for setting in entry.settings:
            key, _, value = setting.partition("=")
            statements.append(sql.SQL("{} SET {} TO {}").format(
                target, sql.Identifier(*key.split(".")), _setting_value(key, value)))
    return statements


def compare_properties(expected: DatabaseProperties, actual: DatabaseProperties) -> list[str]:
    """Human-readable differences between two databases' properties; empty when they match."""
    problems = []
    for field in DatabaseProperties.model_fields:
        want, have = getattr(expected, field), getattr(actual, field)
        if field == "settings":
            want = sorted((s.role or "", sorted(s.settings)) for s in want)
            have = sorted((s.role or "", sorted(s.settings)) for s in have)
        if want != have:
            problems.append(f"database {field}: {have!r}, the backup had {want!r}")
    return problems


def missing_roles(conn: psycopg.Connection, props: DatabaseProperties) -> list[str]:
    present = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles")}
    return sorted(roles_named(props) - present)


# ------------------------------------------------------------------------------------- maintenance db


def maintenance_database(conn: psycopg.Connection, preferred: str, involved: set[str]) -> str:
    """A database to run the renames from: the connection's own unless it is renamed, else ``postgres`` or
    ``template1``, whichever exists, allows connections and is not renamed."""
    allowed = {row[0] for row in conn.execute("SELECT datname FROM pg_database WHERE datallowconn")}
    for candidate in (preferred, "postgres", "template1"):
        if candidate in allowed and candidate not in involved:
            return candidate
    raise PreflightFailed(f"no database to run the renames from: {preferred!r}, 'postgres' and 'template1' are "
                          "all renamed or refuse connections; nothing was changed")


def _names(conn: psycopg.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def _name_of(conn: psycopg.Connection, oid: int) -> str:
    return conn.execute("SELECT datname FROM pg_database WHERE oid = %s", (oid,)).fetchone()[0]  # type: ignore[index]


@dataclass(frozen=True)
class Swap:
    """One database to swap: ``restored`` takes the name ``live``; ``live`` (if it exists) becomes ``kept``."""

    live: str
    restored: str
    kept: str


@dataclass(frozen=True)
class SwapPlan:
    """The renames of one recovery and the database they run from."""

    swaps: list[Swap]
    maintenance_db: str


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def preflight_swap(pg: PostgresConnection, swaps: list[Swap]) -> SwapPlan:
    """Check, changing nothing, that this connection can do every rename of ``swaps``: the restored copies
    exist, the kept names are free, a maintenance database is left to run from, and the user may rename
    (owner with CREATEDB, or superuser), refuse connections to and end the sessions of every database."""
    with pg.connect() as conn:
        names = _names(conn)
        involved = {s.live for s in swaps} | {s.restored for s in swaps} | {s.kept for s in swaps}
        problems = [f"the restored copy {s.restored!r} does not exist" for s in swaps if s.restored not in names]
        problems += [f"{s.kept!r} already exists (an earlier recovery?)" for s in swaps
                     if s.live in names and s.kept in names]
        superuser, createdb, signal = conn.execute(
            "SELECT rolsuper, rolcreatedb, pg_has_role(current_user, 'pg_signal_backend', 'MEMBER') "
            "FROM pg_roles WHERE rolname = current_user").fetchone()  # type: ignore[misc]
        if not superuser:
            if not createdb:
                problems.append(f"user {pg.user!r} lacks CREATEDB (renaming a database needs it, or superuser)")
            if not signal:
                problems.append(f"user {pg.user!r} may not end other sessions (grant pg_signal_backend)")
            for name in sorted(involved & names):
                owned = conn.execute("SELECT pg_has_role(current_user, datdba, 'MEMBER') FROM pg_database "
                                     "WHERE datname = %s", (name,)).fetchone()[0]  # type: ignore[index]
                if not owned:
                    problems.append(f"user {pg.user!r} does not own database {name!r}, so cannot rename it")
        if problems:
            raise PreflightFailed(f"PostgreSQL {pg.describe()} pre-flight: " + "; ".join(problems)
                                  + "; nothing was changed")
        maintenance = maintenance_database(conn, pg.database, involved)
    run_logger().info("pre-flight of %d database rename(s) on %s passed (renames run from %r)", len(swaps),
                      pg.describe(), maintenance)
    return SwapPlan(swaps=swaps, maintenance_db=maintenance)


def _rename_all(pg: PostgresConnection, maintenance_db: str, renames: list[tuple[str, str]], refuse: list[str],
                *, attempts: int, what: str) -> int:
    """Refuse connections to ``refuse``, end their sessions and run every rename in ONE transaction; the
    databases allow connections again afterwards, whatever happened. Returns the sessions ended."""
    terminated = 0
    with pg.connect(maintenance_db, autocommit=True) as admin:
        refused = [row[0] for row in admin.execute(
            "SELECT oid FROM pg_database WHERE datname = ANY(%s) AND datallowconn", (refuse,))]
        try:
            for oid in refused:
                admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
                    sql.Identifier(_name_of(admin, oid))))
            for attempt in range(attempts):
                terminated += admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datid = ANY(%s) AND pid <> pg_backend_pid()", (refused,)).fetchone()[0]  # type: ignore[index]
                try:
                    with admin.transaction():
                        for old, new in renames:
                            admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                                sql.Identifier(old), sql.Identifier(new)))
                    break
                except psycopg.errors.ObjectInUse:
                    if attempt == attempts - 1:
                        raise RestoreFailed(f"sessions kept reconnecting while {what} on {pg.describe()}; "
                                            "no database was renamed") from None
                    time.sleep(0.25)
        finally:
            for oid in refused:  # by oid: the name may have changed
                admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                    sql.Identifier(_name_of(admin, oid))))
    return terminated


@task(cache_policy=NO_CACHE)
def swap_in_databases(pg: PostgresConnection, plan: SwapPlan, *, attempts: int = 20) -> list[str]:
    """Every restored copy takes its live name, every live database its kept name: one transaction, so
    either all databases are the restored ones or none is. Nothing is dropped. Returns the kept names (a
    live name that did not exist keeps nothing)."""
    with pg.connect(plan.maintenance_db) as conn:
        names = _names(conn)
    renames: list[tuple[str, str]] = []
    for swap in plan.swaps:
        if swap.live in names:
            renames.append((swap.live, swap.kept))
        renames.append((swap.restored, swap.live))
    refuse = [s.live for s in plan.swaps] + [s.restored for s in plan.swaps]
    ended = _rename_all(pg, plan.maintenance_db, renames, refuse, attempts=attempts, what="swapping databases")
    kept = [s.kept for s in plan.swaps if s.live in names]
    run_logger().info("swapped %d restored database(s) in on %s in one transaction (kept: %s; %d sessions ended)",
                      len(plan.swaps), pg.describe(), kept, ended)
    return kept


@task(cache_policy=NO_CACHE)
def swap_out_databases(pg: PostgresConnection, plan: SwapPlan, *, attempts: int = 20) -> int:
    """Undo of :func:`swap_in_databases`, also in one transaction: each restored copy goes back to its side
    name and each kept database back to its live name. A swap that never happened is left alone."""
    with pg.connect(plan.maintenance_db) as conn:
        names = _names(conn)
    renames: list[tuple[str, str]] = []
    for swap in plan.swaps:
        if swap.restored in names:
            continue  # this swap is not in: nothing to put back
        if swap.live in names:
            renames.append((swap.live, swap.restored))
        if swap.kept in names:
            renames.append((swap.kept, swap.live))
    if not renames:
        return 0
    refuse = [s.live for s in plan.swaps] + [s.kept for s in plan.swaps]
    ended = _rename_all(pg, plan.maintenance_db, renames, refuse, attempts=attempts,
                        what="renaming databases back")
    run_logger().info("renamed %d database(s) back on %s in one transaction", len(renames), pg.describe())
    return ended


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def drop_databases(pg: PostgresConnection, names: list[str], *, why: str) -> list[str]:
    """Drop databases this run created or was told to drop; returns those that existed."""
    dropped = []
    with pg.connect(autocommit=True) as admin:
        maintenance = maintenance_database(admin, pg.database, set(names))
    with pg.connect(maintenance, autocommit=True) as admin:
        for name in names:
            if name in _names(admin):
                admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
                dropped.append(name)
    if dropped:
        run_logger().info("dropped %s on %s (%s)", dropped, pg.describe(), why)
    return dropped


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def existing_databases(pg: PostgresConnection, names: list[str]) -> list[str]:
    """Which of ``names`` exist on the server."""
    with pg.connect() as conn:
        present = _names(conn)
    return [n for n in names if n in present]
