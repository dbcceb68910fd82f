"""What every `rollback` target shares: its options and result, the approval and the per-target lock
before the first change, the proof of health after it, and the report."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.context import get_run_context
from prefect.states import Cancelled, State
from pydantic import BaseModel, Field

from blocks.app import AppEndpoint
from blocks.errors import RunbookError
from blocks.prometheus import PrometheusAPI
from tasks.app import wait_until_healthy
from tasks.approval import ask_approval
from tasks.kubernetes import DeploymentState, RollbackPlan
from tasks.locks import ensure_lock, lock_name
from tasks.log import run_logger
from tasks.prometheus import CheckResult, MetricCheck, MetricCheckFailed, check_metric, query_instant
from tasks.undo import UndoStack


class RollbackResult(BaseModel):
    target: str
    outcome: str
    changed: list[str]
    before: list[dict[str, Any]]
    after: list[dict[str, Any]]
    checks: list[dict[str, Any]] = Field(default_factory=list)


@dataclass(frozen=True)
class Options:
    """What every target shares: proof, approval, lock, timings."""

    app: AppEndpoint | None
    prometheus: PrometheusAPI | None
    checks: list[MetricCheck]
    confirm: bool
    reason: str
    rollout_timeout: float
    poll: float
    health_timeout: float
    check_interval: float
    approval_timeout: int
    lock_timeout: float


def approve_then_lock(opts: Options, question: str, lines: list[str], name: str,
                      lock_keys: list[str]) -> State | AbstractContextManager[None]:
    """The preamble of every change: unless ``confirm``, pause for the operator (who types ``name``) and
    return a Cancelled state when the answer is no or none; approved, return the context manager that holds
    the per-target locks (``rollback`` + each of ``lock_keys``, waiting up to ``lock_timeout``)."""
    if not opts.confirm:
        refused = _ask_approval(question, lines, opts, name)
        if refused is not None:
            return refused
    locks = [lock_name("rollback", key) for key in lock_keys]
    for lock in locks:
        ensure_lock(lock)
    return concurrency(locks, occupy=1, timeout_seconds=opts.lock_timeout, strict=True)


def prove_healthy(opts: Options, results: list[CheckResult]) -> None:
    """Health through AppEndpoint, then every Prometheus check (each result appended to ``results``, the
    report's evidence); any failure raises (the undos run)."""
    if opts.app is not None:
        wait_until_healthy(opts.app, timeout_seconds=opts.health_timeout, interval_seconds=min(opts.poll, 2),
                           left_as="putting the recorded state back")
    for check in opts.checks:
        assert opts.prometheus is not None
        result = check_metric(opts.prometheus, check, interval_seconds=opts.check_interval)
        results.append(result)
        if not result.passed:
            raise MetricCheckFailed(f"check {result.name!r} failed: {result.detail}; measured "
                                    f"{[round(v, 6) for v in result.values]} (max {result.max:g})")


@task(cache_policy=NO_CACHE)
def current_metric_values(prometheus: PrometheusAPI, checks: list[MetricCheck]) -> list[tuple[str, list[float]]]:
    """One evaluation of each check's query, for the approval form (evidence, no pass/fail)."""
    with prometheus.get_client() as client:
        return [(c.name or c.query, query_instant(client, prometheus, c.query)) for c in checks]


def _ask_approval(title: str, lines: list[str], opts: Options, name: str) -> State | None:
    """Pause for the operator, who types ``name`` (the target) to approve; returns a Cancelled state when
    rejected or timed out, else None (approved)."""
    log = run_logger()
    evidence = [f"- reason: {opts.reason}"] if opts.reason else []
    if opts.prometheus is not None and opts.checks:
        try:
            for metric, values in current_metric_values(opts.prometheus, opts.checks):
                evidence.append(f"- now: `{metric}` = {[round(v, 6) for v in values] or 'no data'}")
        except RunbookError as exc:
            evidence.append(f"- metrics unavailable: {exc}")
    description = "\n".join([title, "", *lines, "", *evidence, "",
                             "Every change has its undo registered first; a failed rollout, health check or metric "
                             "check puts the recorded state back.", "",
                             f"To approve, choose **approve** and type `{name}` (the target) in the form."])
    answer = ask_approval(description, name, opts.approval_timeout)
    if answer is None or not answer.approved:
        why = "timed out" if answer is None else f"rejected ({answer.note or 'no reason given'})"
        log.warning("rollback %s; nothing was changed", why)
        return Cancelled(message=f"approval {why}; nothing was changed")
    return None


def flow_run_name() -> str:
    try:
        return str(get_run_context().flow_run.name)  # type: ignore[union-attr]
    except (RuntimeError, AttributeError):
        return datetime.now(UTC).strftime("run-%Y%m%dT%H%M%SZ")



def report(target: str, outcome: str, before: list[DeploymentState], after: list[DeploymentState],
           results: list[CheckResult], undo: UndoStack | None, plans: list[RollbackPlan],
           evidence: list[str] | None = None) -> None:
    after_by = {s.name: s for s in after}
    lines = [f"# Rollback ({target}): {outcome}", "", f"at {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC", ""]
    if before:
        lines += ["| deployment | before | after |", "|---|---|---|"]
        for s in before:
            a = after_by.get(s.name)
            lines.append(f"| `{s.target}` | rev {s.revision}: {s.image_list()} ({s.available}/{s.replicas}) | "
                         + (f"rev {a.revision}: {a.image_list()} ({a.available}/{a.replicas}) |" if a else "? |"))
        lines.append("")
    if plans:
        lines += ["Planned:", *[f"- `{p.target}`: revision {p.from_revision} -> "
                                f"{p.to_revision if p.to_revision is not None else 'explicit images'} "
                                f"({', '.join(f'{c}={i}' for c, i in p.images.items())})" for p in plans], ""]
    if evidence:
        lines += ["Evidence:", *[f"- {e}" for e in evidence], ""]
    if results:
        lines += ["| check | max | worst | values | result |", "|---|---|---|---|---|"]
        lines += [f"| `{r.name}` | {r.max:g} | {r.worst if r.worst is not None else '-'} | "
                  f"{[round(v, 6) for v in r.values]} | {'pass' if r.passed else 'FAIL: ' + r.detail} |"
                  for r in results]
        lines.append("")
    if undo is not None and undo.outcomes:
        lines += ["Undone:", *[f"- {o.step}: {'ok' if o.ok else 'FAILED: ' + o.error}" for o in undo.outcomes], ""]
    create_markdown_artifact("\n".join(lines), key="rollback-report")
    run_logger().info("rollback (%s): %s", target, outcome)
