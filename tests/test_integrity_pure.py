"""db-integrity-check's pure parts: pattern quoting, pg_amcheck output parsing, grading, the metrics text."""

from __future__ import annotations

import pytest

from tasks.findings import (
    Check,
    Finding,
    Remediation,
    Severity,
    at_or_above,
    counts_by_severity,
    grade,
    pattern_literal,
    remaining_calls,
    sequence_used_fraction,
    sort_findings,
    summary_markdown,
)
from tasks.integrity import (
    AmcheckOptions,
    SessionRow,
    Thresholds,
    amcheck_argv,
    effective_max,
    parse_amcheck_output,
    session_findings,
    settle_checksum_failures,
)
from tasks.metrics import findings_registry
from tasks.remediation import indexes_to_reindex, tables_to_vacuum


@pytest.mark.parametrize(("name", "pattern"), [
    ("app", '"app"'),
    ("App", '"App"'),  # unquoted, psql patterns fold to lower case
    ('we"ird', '"we""ird"'),
    ("a*", '"a*"'),
    ("a?b", '"a?b"'),
    ("sales.eu", '"sales.eu"'),  # unquoted, a dot separates database from schema
    ("my db", '"my db"'),
    ("bücher", '"bücher"'),
    ('""', '""""""'),
    ("$1", '"$1"'),
])
def test_pattern_literal_quotes_the_whole_name(name: str, pattern: str) -> None:
    assert pattern_literal(name) == pattern


def test_pattern_literal_rejects_what_no_database_can_be_called() -> None:
    with pytest.raises(ValueError, match="empty"):
        pattern_literal("")
    with pytest.raises(ValueError, match="NUL"):
        pattern_literal("a\x00b")


def test_amcheck_argv_depth_switches() -> None:
    light = amcheck_argv("/bin/pg_amcheck", ["app", "a*"], AmcheckOptions(), install_missing=False)
    assert light == ["/bin/pg_amcheck", "--no-password", "--jobs=2", '--database="app"', '--database="a*"',
                     "--exclude-toast-pointers"]
    deep = amcheck_argv("/bin/pg_amcheck", ["app"], AmcheckOptions(heapallindexed=True, parent_check=True,
                                                                    toast=True, jobs=4), install_missing=True)
    assert deep == ["/bin/pg_amcheck", "--no-password", "--jobs=4", '--database="app"', "--install-missing",
                    "--heapallindexed", "--parent-check"]
    with pytest.raises(Exception, match="at least one database"):
        amcheck_argv("/bin/pg_amcheck", [], AmcheckOptions(), install_missing=False)


# Captured from pg_amcheck 15 against the corruption the cluster tests write (checksums off, then on).
OUTPUT = """\
btree index "postgres.public.t_pkey":
    ERROR:  line pointer points past end of tuple space in index "t_pkey"
    DETAIL:  Index tid=(2,245) lp_off=11742, lp_len=30687 lp_flags=1.
heap table "postgres.public.u", block 3, offset 8:
    data begins at offset 90 beyond the tuple length 82
heap table "postgres.public.u", block 3, offset 9:
    data begins at offset 90 beyond the tuple length 82
heap table "postgres.public.u", block 4, offset 1, attribute 2:
    toast value 16400 not found in toast table
btree index "sales.eu.public.orders_pkey":
    ERROR:  invalid page in block 2 of relation base/5/16389
heap table "sales.public.u":
    ERROR:  invalid page in block 3 of relation base/5/16391
"""


def test_parse_amcheck_output_groups_by_relation_and_finds_the_database() -> None:
    problems = parse_amcheck_output(OUTPUT, ["postgres", "sales", "sales.eu"])
    found = {(p.kind, p.database, p.name): p for p in problems}
    assert list(found) == [("index", "postgres", "public.t_pkey"), ("heap", "postgres", "public.u"),
                           ("index", "sales.eu", "public.orders_pkey"), ("heap", "sales", "public.u")]
    heap = found[("heap", "postgres", "public.u")]
    assert heap.blocks == {3, 4}
    assert heap.messages == ["data begins at offset 90 beyond the tuple length 82",
                             "toast value 16400 not found in toast table"]
    assert found[("index", "postgres", "public.t_pkey")].messages[0].startswith("ERROR:  line pointer")
    assert parse_amcheck_output("", ["postgres"]) == []


def test_grade_and_severity_order() -> None:
    assert grade(5, 10, 20) is None
    assert grade(10, 10, 20) is Severity.warning
    assert grade(25, 10, 20) is Severity.critical
    assert grade(25, None, None) is None
    assert grade(25, 10, None) is Severity.warning
    assert [s.rank for s in (Severity.info, Severity.warning, Severity.critical)] == [0, 1, 2]


def _finding(severity: Severity, check: Check = Check.sessions, **kw: object) -> Finding:
    base = {"database": "app", "object": "x", "detail": "d", "action": "a"}
    return Finding(check=check, severity=severity, **{**base, **kw})  # type: ignore[arg-type]


def test_counts_sort_and_fail_on() -> None:
    findings = [_finding(Severity.info), _finding(Severity.critical, Check.amcheck), _finding(Severity.warning)]
    assert counts_by_severity(findings) == {"info": 1, "warning": 1, "critical": 1}
    assert counts_by_severity([]) == {"info": 0, "warning": 0, "critical": 0}
    assert [f.severity for f in sort_findings(findings)] == [Severity.critical, Severity.warning, Severity.info]
    assert len(at_or_above(findings, Severity.warning)) == 2
    assert len(at_or_above(findings, Severity.info)) == 3


def test_sequence_arithmetic() -> None:
    assert sequence_used_fraction(None, 1, 100, 1) == 0.0
    assert sequence_used_fraction(91, 1, 101, 1) == pytest.approx(0.9)
    assert sequence_used_fraction(-91, -101, -1, -1) == pytest.approx(0.9)  # descending: counts from the top
    assert remaining_calls(91, 1, 101, 1) == 10
    assert remaining_calls(91, 1, 101, 5) == 2
    assert remaining_calls(None, 1, 101, 1) == 101
    assert remaining_calls(-91, -101, -1, -1) == 10
    assert effective_max(2**63 - 1, "integer") == 2**31 - 1
    assert effective_max(2**63 - 1, None) == 2**63 - 1
    assert effective_max(1000, "bigint") == 1000


def _session(state: str, state_seconds: float, xact_seconds: float | None = None, pid: int = 7) -> SessionRow:
    return SessionRow(pid=pid, database="app", user="u", application="web", client="10.0.0.1", state=state,
                      xact_seconds=xact_seconds, state_seconds=state_seconds, backend_start="t", query="SELECT 1")


def test_session_findings_against_thresholds() -> None:
    t = Thresholds(long_transaction_minutes=10, idle_in_transaction_minutes=5, idle_session_minutes=30)
    found = session_findings([
        _session("idle in transaction", 301, 400, pid=1),
        _session("idle in transaction (aborted)", 299, 400, pid=2),  # under the threshold
        _session("active", 10, 601, pid=3),
        _session("active", 10, 599, pid=4),
        _session("idle", 1800, None, pid=5),
        _session("idle", 1799, None, pid=6),
    ], t)
    assert [(f.pid, f.kind, f.severity) for f in found] == [
        (1, "idle in transaction", Severity.warning), (3, "long transaction", Severity.warning),
        (5, "idle", Severity.info)]


def test_checksum_failures_settle_only_where_amcheck_found_the_database_intact() -> None:
    failures = [_finding(Severity.critical, Check.checksums, database=db, kind="failures") for db in ("a", "b")]
    settled = settle_checksum_failures(failures, ["a"])
    assert [(f.database, f.severity) for f in settled] == [("a", Severity.warning), ("b", Severity.critical)]
    assert "intact now" in settled[0].detail


def test_indexes_to_reindex_never_touches_indexes_of_damaged_tables() -> None:
    heap = _finding(Severity.critical, Check.amcheck, kind="heap", schema_name="public", relation="u")
    on_damaged = _finding(Severity.critical, Check.amcheck, kind="index", schema_name="public", relation="u_pkey",
                          parent="public.u")
    corrupt = _finding(Severity.critical, Check.amcheck, kind="index", schema_name="public", relation="t_pkey",
                       parent="public.t")
    invalid = _finding(Severity.warning, Check.invalid_indexes, kind="invalid", schema_name="public",
                       relation="t_email", parent="public.t")
    leftover = _finding(Severity.warning, Check.invalid_indexes, kind="leftover", schema_name="public",
                        relation="t_email_ccnew", parent="public.t")
    same_again = _finding(Severity.warning, Check.invalid_indexes, kind="invalid", schema_name="public",
                          relation="t_pkey", parent="public.t")
    chosen, skipped = indexes_to_reindex([heap, on_damaged, corrupt, invalid, leftover, same_again])
    assert [f.relation for f in chosen] == ["t_pkey", "t_email"]
    assert skipped == [on_damaged]


def test_findings_metrics_have_every_severity() -> None:
    from prometheus_client import generate_latest

    registry = findings_registry({"critical": 2, "info": 0, "warning": 1}, remediated=3, checked_at=1700000000.0)
    text = generate_latest(registry).decode()
    assert 'runbooks_integrity_findings{severity="critical"} 2.0' in text
    assert 'runbooks_integrity_findings{severity="info"} 0.0' in text
    assert "runbooks_integrity_remediations 3.0" in text
    assert text.count("# TYPE runbooks_integrity_findings gauge") == 1


def test_summary_markdown_says_verdict_changes_and_recovery() -> None:
    findings = [_finding(Severity.critical, Check.amcheck, object="public.u|x"), _finding(Severity.info)]
    text = summary_markdown(findings, [Remediation(action="REINDEX INDEX CONCURRENTLY", database="app",
                                                   object="public.t_pkey", before="valid", after="valid", ok=True)],
                            databases=["app"], checks=list(Check), fail_on=Severity.critical, recovery="restore X")
    assert text.startswith("# db-integrity-check: FAILED: 1 finding(s) at or above critical")
    assert "public.u\\|x" in text and "| REINDEX INDEX CONCURRENTLY |" in text and "restore X" in text
    assert "SELECT 1" not in text
    clean = summary_markdown([_finding(Severity.info)], [], databases=["app"], checks=[Check.sessions],
                             fail_on=Severity.warning, recovery=None)
    assert clean.startswith("# db-integrity-check: PASSED") and "## Findings" not in clean


def test_tables_to_vacuum_skips_damaged_tables() -> None:
    heap = _finding(Severity.critical, Check.amcheck, kind="heap", schema_name="public", relation="u")
    damaged = _finding(Severity.warning, Check.vacuum, kind="stale", schema_name="public", relation="u",
                       object="public.u")
    fine = _finding(Severity.warning, Check.vacuum, kind="stale", schema_name="public", relation="t",
                    object="public.t")
    elsewhere = _finding(Severity.warning, Check.vacuum, kind="stale", schema_name="public", relation="u",
                         object="public.u", database="other")
    assert tables_to_vacuum([heap, damaged, fine, elsewhere]) == ([fine, elsewhere], [damaged])
