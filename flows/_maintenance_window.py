"""The maintenance window's record (each step timed, what changed, what is left) and the summary written from
it: the steps table, the outcome sentence and the artifacts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.alertmanager import Silence
from tasks.housekeeping import HousekeepingResult
from tasks.log import run_logger
from tasks.prometheus import CheckResult
from tasks.undo import UndoStack


@dataclass
class StepRecord:
    step: str
    started: datetime
    seconds: float = 0.0
    result: str = "running"


@dataclass
class Window:
    """Everything the summary reports; filled in as the steps run."""

    run_name: str
    steps: list[StepRecord] = field(default_factory=list)
    silence: Silence | None = None
    silence_expired: bool = False
    maintenance_on: bool = False
    backup_set_id: str | None = None
    backup_store: str | None = None
    restore_point: str | None = None
    restore_point_lsn: str | None = None
    before: dict[str, str] = field(default_factory=dict)  # what -> image or version
    after: dict[str, str] = field(default_factory=dict)
    migration: str = "not run"
    migration_failed: bool = False
    checks: list[CheckResult] = field(default_factory=list)
    housekeeping: list[HousekeepingResult] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    @contextmanager
    def step(self, name: str) -> Iterator[StepRecord]:
        record = StepRecord(name, datetime.now(UTC))
        self.steps.append(record)
        started = time.monotonic()
        try:
            yield record
        except BaseException as exc:
            record.result = f"FAILED: {exc}"
            raise
        else:
            if record.result == "running":
                record.result = "ok"
        finally:
            record.seconds = round(time.monotonic() - started, 2)

    def skip(self, name: str, why: str) -> None:
        self.steps.append(StepRecord(name, datetime.now(UTC), 0.0, f"skipped: {why}"))


def window_outcome(window: Window, failure: BaseException | None, undo: UndoStack) -> str:
    if failure is None:
        done = {s.step: s.result for s in window.steps}
        parts = [what for step, what in [("update", "updated"), ("migration", "migrated"), ("backup", "backed up")]
                 if step in done and not done[step].startswith("skipped")]
        parts.append("healthy")
        if "maintenance off" in done:
            parts.append("maintenance off")
        if window.silence_expired:
            parts.append("silence expired")
        if window.findings:
            parts.append(f"{len(window.findings)} housekeeping finding(s)")
        return "completed: " + ", ".join(parts)
    parts = [f"FAILED: {failure}"]
    failed_undos = [o for o in undo.outcomes if not o.ok]
    if window.before and undo.outcomes:
        put_back = [o for o in undo.outcomes if o.step.startswith("put ")]
        if put_back and all(o.ok for o in put_back):
            parts.append("the update was put back to the recorded version")
        elif put_back:
            parts.append("putting the update back FAILED")
    for o in failed_undos:
        parts.append(f"{o.step}: FAILED ({o.error})")
    if window.maintenance_on:
        parts.append("MAINTENANCE MODE STAYS ON (the app is not healthy): act now")
    elif any(s.step == "maintenance on" for s in window.steps):
        parts.append("maintenance mode is off again")
    if window.silence is not None:
        parts.append("silence expired" if window.silence_expired else
                     f"silence {window.silence.id} NOT expired: it ends by itself at "
                     f"{window.silence.ends_at:%Y-%m-%d %H:%M:%S} UTC")
    if window.migration_failed:
        parts.append(_way_back(window))
    return "; ".join(parts)


def _way_back(window: Window) -> str:
    """What a failed migration leaves, and the runbooks that go back to before it."""
    text = "the migration is NOT undone (the database may be partly migrated)"
    if window.restore_point:
        text += (f"; to go back: `pitr-restore` to restore point `{window.restore_point}` "
                 f"(LSN {window.restore_point_lsn})")
    if window.backup_set_id:
        text += f"; or `disaster-recovery` from backup set `{window.backup_set_id}` ({window.backup_store})"
    return text


def step_row(s: StepRecord) -> dict[str, Any]:
    return {"step": s.step, "started": f"{s.started:%H:%M:%S}", "seconds": s.seconds, "result": s.result}


def write_summary(window: Window, outcome: str, undo: UndoStack, reason: str) -> None:
    create_table_artifact([step_row(s) for s in window.steps], key="maintenance-steps",
                          description="Each step of the maintenance window, timed")
    lines = [f"# Maintenance window `{window.run_name}`", "", f"**{outcome}**", "", f"- reason: {reason}",
             f"- ended at {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC"]
    if window.silence is not None:
        lines.append(f"- silence `{window.silence.id}` ({', '.join(window.silence.matchers)}), until "
                     f"{window.silence.ends_at:%Y-%m-%d %H:%M:%S} UTC: "
                     f"{'expired' if window.silence_expired else 'NOT expired'}")
    lines.append(f"- backup set: `{window.backup_set_id}` in `{window.backup_store}`" if window.backup_set_id
                 else "- backup set: none")
    lines.append(f"- restore point: `{window.restore_point}` at {window.restore_point_lsn}" if window.restore_point
                 else "- restore point: none")
    lines.append(f"- migration: {window.migration}")
    lines.append(f"- maintenance mode: {'ON' if window.maintenance_on else 'off'}")
    if window.migration_failed:
        lines.append(f"- {_way_back(window)}")
    lines += ["", "| step | started (UTC) | seconds | result |", "|---|---|---|---|"]
    lines += [f"| {s.step} | {s.started:%H:%M:%S} | {s.seconds} | {s.result.replace('|', '/')} |"
              for s in window.steps]
    if window.before:
        lines += ["", "| what | before | after |", "|---|---|---|"]
        lines += [f"| `{k}` | `{v}` | `{window.after.get(k, '?')}` |" for k, v in window.before.items()]
    if window.checks:
        lines += ["", "| check | max | worst | result |", "|---|---|---|---|"]
        lines += [f"| `{r.name}` | {r.max:g} | {r.worst if r.worst is not None else '-'} | "
                  f"{'pass' if r.passed else 'FAIL: ' + r.detail} |" for r in window.checks]
    if window.findings:
        lines += ["", "Housekeeping findings:", *[f"- {f}" for f in window.findings]]
    if window.housekeeping:
        out = ["# Housekeeping output", ""]
        for h in window.housekeeping:
            out += [f"## {h.step}: {'ok' if h.ok else 'FAILED'}: {h.summary}", "",
                    *[f"`{c}`" for c in h.commands], "", "```", h.output.replace("```", "'''"), "```", ""]
        create_markdown_artifact("\n".join(out), key="maintenance-housekeeping", description="Housekeeping output")
    if undo.outcomes:
        lines += ["", "Undone (newest first):", *[f"- {o.step}: {'ok' if o.ok else 'FAILED: ' + o.error}"
                                                  for o in undo.outcomes]]
    create_markdown_artifact("\n".join(lines), key="maintenance-summary", description="Maintenance window summary")
    run_logger().info("maintenance window %s: %s", window.run_name, outcome)


def flow_run_name() -> str:
    from prefect.context import get_run_context

    try:
        return str(get_run_context().flow_run.name)  # type: ignore[union-attr]
    except (RuntimeError, AttributeError):
        return datetime.now(UTC).strftime("run-%Y%m%dT%H%M%SZ")
