"""What the integrity checks find, and the pure rules that grade and render it (no I/O here).

A :class:`Finding` is one problem (or one fact worth knowing) about one object: which check found it, in
which database, on which object, how bad it is, the evidence, and what to do about it. Remediation
steps report a :class:`Remediation` each, with the state before and after.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from enum import StrEnum

from pydantic import BaseModel, Field


class Severity(StrEnum):
    """How bad a finding is; ordered info < warning < critical."""

    info = "info"
    warning = "warning"
    critical = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Severity.info: 0, Severity.warning: 1, Severity.critical: 2}


class Check(StrEnum):
    """The checks the runbook can run (the names operators pick in the ``checks`` parameter)."""

    amcheck = "amcheck"
    checksums = "checksums"
    invalid_indexes = "invalid_indexes"
    wraparound = "wraparound"
    sequences = "sequences"
    sessions = "sessions"
    replication = "replication"
    vacuum = "vacuum"


class Finding(BaseModel):
    """One thing a check found. ``schema_name``/``relation``/``pid`` identify the object for remediation."""

    check: Check
    database: str = Field(description="Database the object lives in; '' for server-wide findings.")
    object: str = Field(description="What the finding is about, for people: a relation, a slot, a session.")
    severity: Severity
    detail: str
    action: str = Field(description="What an operator (or a remediation switch) should do.")
    kind: str = Field(default="", description="Machine-readable sub-kind: 'index', 'heap', 'idle in transaction'.")
    schema_name: str | None = None
    relation: str | None = None
    parent: str | None = Field(default=None, description="schema.table an index or TOAST relation belongs to.")
    pid: int | None = None

    def row(self) -> dict[str, str]:
        """The findings-table row shown in the Prefect UI."""
        return {"severity": self.severity.value, "check": self.check.value, "database": self.database,
                "object": self.object, "detail": self.detail, "action": self.action}


class Remediation(BaseModel):
    """One change a remediation switch made (or tried), with the state before and after."""

    action: str = Field(description="e.g. 'REINDEX INDEX CONCURRENTLY', 'terminate session', 'VACUUM (ANALYZE)'.")
    database: str
    object: str
    before: str
    after: str
    ok: bool
    error: str = ""


def qualified(schema: str, name: str) -> str:
    """``schema.name`` as people read it (not quoted; for display only)."""
    return f"{schema}.{name}"


def at_or_above(findings: Iterable[Finding], severity: Severity) -> list[Finding]:
    return [f for f in findings if f.severity.rank >= severity.rank]


def counts_by_severity(findings: Iterable[Finding]) -> dict[str, int]:
    """Every severity, zero included (the metrics push a value for each)."""
    counted = Counter(f.severity for f in findings)
    return {s.value: counted.get(s, 0) for s in Severity}


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Worst first, then by check, database and object: the order of the findings table."""
    return sorted(findings, key=lambda f: (-f.severity.rank, f.check.value, f.database, f.object))


def grade(value: float, warning: float | None, critical: float | None) -> Severity | None:
    """The severity of a measured value against two thresholds (None: that level is off); None when below."""
    if critical is not None and value >= critical:
        return Severity.critical
    if warning is not None and value >= warning:
        return Severity.warning
    return None


def sequence_used_fraction(last_value: int | None, min_value: int, max_value: int, increment: int) -> float:
    """How much of a sequence's range is used up, 0.0 .. 1.0, counting in its direction.

    A sequence never called (``last_value`` NULL in pg_sequences) has used nothing.
    """
    if last_value is None or max_value == min_value:
        return 0.0
    span = max_value - min_value
    used = (last_value - min_value) if increment > 0 else (max_value - last_value)
    return min(1.0, max(0.0, used / span))


def remaining_calls(last_value: int | None, min_value: int, max_value: int, increment: int) -> int:
    """How many more ``nextval()`` calls the sequence has before it errors out."""
    if increment == 0:
        return 0
    if last_value is None:
        last_value = min_value - increment if increment > 0 else max_value - increment
    room = (max_value - last_value) if increment > 0 else (last_value - min_value)
    return max(0, room // abs(increment))


def pattern_literal(name: str) -> str:
    """A psql-style pattern (pg_amcheck ``--database``, ``--table``, ...) that matches exactly ``name``.

    Inside double quotes nothing is special (``*``, ``?``, ``.``, upper case, spaces, non-ASCII are taken
    literally) and a doubled quote stands for one, so the whole name goes inside one pair of quotes.
    """
    if not name:
        raise ValueError("an empty name cannot be matched by a pattern")
    if "\x00" in name:
        raise ValueError("a name cannot contain a NUL byte")
    return '"' + name.replace('"', '""') + '"'


def summary_markdown(findings: list[Finding], remediations: list[Remediation], *, databases: list[str],
                     checks: list[Check], fail_on: Severity, recovery: str | None) -> str:
    """The run's markdown report: verdict, counts, findings worth reading, what was changed, recovery."""
    counts = counts_by_severity(findings)
    failing = at_or_above(findings, fail_on)
    verdict = f"FAILED: {len(failing)} finding(s) at or above {fail_on.value}" if failing else "PASSED"
    lines = [
        f"# db-integrity-check: {verdict}",
        "",
        f"Databases: {', '.join(f'`{d}`' for d in databases) or '(none)'}  ",
        f"Checks: {', '.join(c.value for c in checks)}  ",
        f"Findings: {counts['critical']} critical, {counts['warning']} warning, {counts['info']} info",
        "",
    ]
    worth = [f for f in sort_findings(findings) if f.severity.rank > Severity.info.rank]
    if worth:
        lines += ["## Findings", "", "| severity | check | database | object | detail | action |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {f.severity.value} | {f.check.value} | {_code(f.database)} | {_code(f.object)} | "
                  f"{_cell(f.detail)} | {_cell(f.action)} |" for f in worth]
        lines.append("")
    if remediations:
        lines += ["## Remediation (before -> after)", "", "| action | database | object | before | after | ok |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r.action} | {_code(r.database)} | {_code(r.object)} | {_cell(r.before)} | "
                  f"{_cell(r.after + (f' ({r.error})' if r.error else ''))} | {'yes' if r.ok else 'NO'} |"
                  for r in remediations]
        lines.append("")
    if recovery:
        lines += ["## Heap corruption: recovery options", "", recovery, ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    """A name in a table cell as code: ``user@host`` would otherwise become a mail link."""
    return f"`{_cell(text).replace('`', chr(39))}`" if text else ""
