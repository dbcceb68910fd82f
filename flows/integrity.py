"""The `db-integrity-check` runbook: find corruption and the slow-burning risks of a PostgreSQL server,
show them in the UI, and fix only what a switch asks for.

Checks (each a task returning findings): pg_amcheck (heap + B-tree, ``--jobs``), data checksums and
checksum failures, invalid indexes, XID/multixact wraparound age, sequences near their end, long and idle
transactions, replication slots and WAL archiving, stale tables. Remediation switches, all off by default:
REINDEX INDEX CONCURRENTLY, terminate idle-in-transaction / idle sessions, VACUUM (ANALYZE) stale tables.
Heap corruption is never "fixed": the report names the newest verified backup and the PITR options.
The run fails when a finding at or above ``fail_on`` remains, so the usual failure alerting fires.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Annotated

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from pydantic import BaseModel, Field

from blocks.errors import IntegrityCheckFailed
from blocks.postgres import PostgresConnection
from blocks.store import BackupStore
from flows._form import DANGER, param
from tasks.approval import refused_at_start
from tasks.findings import (
    Check,
    Finding,
    Remediation,
    Severity,
    at_or_above,
    counts_by_severity,
    sort_findings,
    summary_markdown,
)
from tasks.integrity import (
    AmcheckOptions,
    Thresholds,
    check_checksums,
    check_corruption,
    check_invalid_indexes,
    check_replication,
    check_sequences,
    check_sessions,
    check_vacuum,
    check_wraparound,
    list_databases,
    settle_checksum_failures,
)
from tasks.locks import ensure_lock, lock_name
from tasks.log import run_logger
from tasks.metrics import findings_registry, push_flow_run_metrics, push_metrics
from tasks.notify import notify_hook
from tasks.remediation import (
    indexes_to_reindex,
    recovery_options,
    reindex_index,
    tables_to_vacuum,
    terminate_sessions,
    vacuum_table,
)

RUNBOOK = "db-integrity-check"
IDLE_IN_TRANSACTION = ["idle in transaction", "idle in transaction (aborted)"]


class IntegrityReport(BaseModel):
    """What the run found, what it changed, and what is still open."""

    databases: list[str]
    checks: list[Check]
    findings: list[Finding] = Field(description="Still open after remediation, worst first.")
    resolved: list[Finding] = Field(default_factory=list, description="Found, then fixed by a remediation switch.")
    remediations: list[Remediation] = Field(default_factory=list)
    counts: dict[str, int]
    recovery: str | None = None
    ok: bool


@task(cache_policy=NO_CACHE)
def push_findings_metrics(counts: dict[str, int], remediated: int) -> bool:
    """Open findings by severity to the Pushgateway (best effort, as every runbook metric)."""
    return push_metrics(RUNBOOK, findings_registry(counts, remediated=remediated, checked_at=time.time()),
                           len(counts) + 2)


@flow(name=RUNBOOK, on_completion=[push_flow_run_metrics],
      on_failure=[notify_hook("FAILED"), push_flow_run_metrics],
      on_crashed=[notify_hook("CRASHED"), push_flow_run_metrics])
def db_integrity_check(
    postgres: Annotated[PostgresConnection, param(
        "PostgreSQL server", "The server to check (read-only unless a remediation switch below is on).")],
    databases: Annotated[list[str] | None, param(
        "Databases", "Databases to check. Empty (default): every database that accepts connections.")] = None,
    checks: Annotated[list[Check] | None, param(
        "Checks", "Which checks to run. Empty (default): all of them.")] = None,
    fail_on: Annotated[Severity, param(
        "Fail on", "The run fails when a finding this bad remains. critical by default.")] = Severity.critical,
    install_amcheck: Annotated[bool, param(
        "Create amcheck", "CREATE EXTENSION amcheck where it is missing. Off by default: such a database is "
        "reported as not checked.")] = False,
    amcheck: Annotated[AmcheckOptions | None, param(
        "amcheck options", "pg_amcheck depth and parallel jobs. Empty: the defaults (light checks, 2 "
        "jobs).")] = None,
    thresholds: Annotated[Thresholds | None, param(
        "Thresholds", "When a risk becomes a finding (transaction ages, wraparound, sequence use, ...). Empty: "
        "the defaults in docs/integrity.md.")] = None,
    reindex: Annotated[bool, param(
        DANGER + "reindex damaged indexes", "REINDEX INDEX CONCURRENTLY the indexes amcheck flags or that "
        "are invalid. Off by default: they are only reported.")] = False,
    terminate_idle_in_transaction: Annotated[bool, param(
        DANGER + "terminate sessions idle in transaction", "Terminate sessions idle in a transaction longer "
        "than the threshold (their transactions roll back). Off by default: only reported.")] = False,
    terminate_idle_sessions: Annotated[bool, param(
        DANGER + "terminate idle sessions", "Terminate sessions idle longer than the threshold. Off by "
        "default: only reported.")] = False,
    exclude_applications: Annotated[list[str], param(
        "Never terminate", "application_name values never terminated (the runbook's own 'runbooks' never "
        "is). Empty by default.")] = [],  # noqa: B006
    vacuum_stale_tables: Annotated[bool, param(
        "Vacuum stale tables", "VACUUM (ANALYZE) tables whose statistics are stale. Off by default: only "
        "reported.")] = False,
    store: Annotated[BackupStore | None, param(
        "Backup store", "Used to name the newest verified backup set when table data is damaged. Empty: no "
        "backup is named.")] = None,
    lock_timeout_seconds: Annotated[float, param(
        "Lock wait (s)", "Wait this long for another remediating run on the same server, then fail. 600 by "
        "default.", gt=0)] = 600,
    notify_block: Annotated[str | None, param(
        "Notify", "A saved notification Block (e.g. slack-webhook/ops) told of a failed run. Empty: nobody "
        "is told.")] = None,
) -> IntegrityReport:
    """Check a PostgreSQL server for corruption and slow-burning risks; fix only what a switch asks for."""
    if (refused := refused_at_start()) is not None:  # an alert's approval form said reject
        return refused
    log = run_logger()
    amcheck = amcheck or AmcheckOptions()
    thresholds = thresholds or Thresholds()
    chosen = list(dict.fromkeys(checks or list(Check)))
    dbs = list_databases(postgres, databases)
    findings: list[Finding] = []
    amchecked: list[str] = []
    if Check.amcheck in chosen:
        run = check_corruption(postgres, dbs, amcheck, install_amcheck=install_amcheck)
        findings += run.findings
        amchecked = run.databases
    if Check.checksums in chosen:
        findings += check_checksums(postgres, dbs)
    if Check.invalid_indexes in chosen:
        findings += check_invalid_indexes(postgres, dbs)
    if Check.wraparound in chosen:
        findings += check_wraparound(postgres, dbs, thresholds)
    if Check.sequences in chosen:
        findings += check_sequences(postgres, dbs, thresholds)
    if Check.sessions in chosen:
        findings += check_sessions(postgres, dbs, thresholds)
    if Check.replication in chosen:
        findings += check_replication(postgres, thresholds)
    if Check.vacuum in chosen:
        findings += check_vacuum(postgres, dbs, thresholds)

    remediations: list[Remediation] = []
    resolved: list[Finding] = []
    switches = reindex or terminate_idle_in_transaction or terminate_idle_sessions or vacuum_stale_tables
    with ExitStack() as stack:
        if switches:  # one remediating run per server at a time
            lock = lock_name(RUNBOOK, postgres.describe())
            ensure_lock(lock)
            stack.enter_context(concurrency(lock, occupy=1, timeout_seconds=lock_timeout_seconds, strict=True))
        if reindex:
            chosen_indexes, skipped = indexes_to_reindex(findings)
            for finding in skipped:
                log.warning("not reindexing %s: its table %s has damaged rows", finding.object, finding.parent)
            for finding in chosen_indexes:
                done = reindex_index(postgres, finding)
                remediations.append(done)
                if done.ok:
                    resolved += [f for f in findings if f.database == finding.database
                                 and f.check in (Check.amcheck, Check.invalid_indexes)
                                 and (f.schema_name, f.relation) == (finding.schema_name, finding.relation)]
        for enabled, kind, states, minutes in (
                (terminate_idle_in_transaction, "idle in transaction", IDLE_IN_TRANSACTION,
                 thresholds.idle_in_transaction_minutes),
                (terminate_idle_sessions, "idle", ["idle"], thresholds.idle_session_minutes)):
            targets = [f for f in findings if f.check == Check.sessions and f.kind == kind]
            if enabled and targets:
                done_sessions = terminate_sessions(postgres, targets, states=states, min_seconds=minutes * 60,
                                                   exclude_applications=exclude_applications)
                remediations += done_sessions
                ended = {r.object for r in done_sessions if r.after == "session ended"}
                resolved += [f for f in targets if f.object in ended]
        if vacuum_stale_tables:
            stale, damaged = tables_to_vacuum(findings)
            for finding in damaged:
                log.warning("not vacuuming %s: its heap is damaged", finding.object)
            for finding in stale:
                done = vacuum_table(postgres, finding)
                remediations.append(done)
                if done.ok:
                    resolved.append(finding)

    resolved_ids = {id(f) for f in resolved}
    remaining = [f for f in findings if id(f) not in resolved_ids]
    # A checksum failure counter never goes down: where amcheck (after any reindex) finds the database intact,
    # the damage it counted is gone and the finding says so as a warning.
    damaged = {f.database for f in remaining if f.check == Check.amcheck}
    remaining = sort_findings(settle_checksum_failures(remaining, [d for d in amchecked if d not in damaged]))
    heap = [f for f in remaining if f.check == Check.amcheck and f.kind == "heap"]
    recovery = recovery_options(store, heap) if heap else None
    counts = counts_by_severity(remaining)
    push_findings_metrics(counts, sum(1 for r in remediations if r.ok))
    failing = at_or_above(remaining, fail_on)
    report = IntegrityReport(databases=dbs, checks=chosen, findings=remaining, resolved=sort_findings(resolved),
                             remediations=remediations, counts=counts, recovery=recovery, ok=not failing)
    rows = [{**f.row(), "status": "open"} for f in remaining] + [{**f.row(), "status": "fixed"} for f in resolved]
    create_table_artifact(rows or [{"severity": "-", "check": "-", "database": "-", "object": "-",
                                    "detail": "no findings", "action": "-", "status": "-"}],
                          key="integrity-findings", description=f"{RUNBOOK} of `{postgres.describe()}`")
    create_markdown_artifact(
        summary_markdown(remaining, remediations, databases=dbs, checks=chosen, fail_on=fail_on, recovery=recovery),
        key="integrity-report", description=f"{RUNBOOK} of `{postgres.describe()}`")
    log.info("%s of %s: %s open (%s), %d change(s) made", RUNBOOK, postgres.describe(), len(remaining), counts,
             len(remediations))
    if failing:
        worst = "; ".join(f"{f.severity.value} {f.check.value} {f.database}/{f.object}" for f in failing[:5])
        message = f"{len(failing)} finding(s) at or above {fail_on.value} remain on {postgres.describe()}: {worst}"
        raise IntegrityCheckFailed(message, report)
    return report
