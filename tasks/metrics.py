"""Runbook run metrics for Prometheus, pushed to a Pushgateway when one is configured.

Each finished run of a runbook pushes, under the grouping key ``job="runbooks", runbook=<flow name>``:

- success: ``runbooks_last_success_timestamp_seconds``, ``runbooks_last_run_duration_seconds``,
  ``runbooks_last_run_size_bytes`` (when the run reports a size), ``runbooks_last_run_success`` = 1,
  ``runbooks_last_run_timestamp_seconds``;
- failure or crash: ``runbooks_last_failure_timestamp_seconds``, ``runbooks_last_run_success`` = 0,
  ``runbooks_last_run_timestamp_seconds``; the last success stays as it was (the push replaces only the
  metrics it names), so ``BackupMissing`` keeps counting from the last good backup.

The Pushgateway is $RUNBOOKS_PUSHGATEWAY_URL (e.g. http://pushgateway:9091); unset, nothing is pushed.
Pushing is best effort: a Pushgateway outage is logged and never fails the runbook. The pure part,
:func:`run_metrics`, is tested without a service; :func:`runbook_metrics_hooks` gives the flow hooks.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest, pushadd_to_gateway

PUSHGATEWAY_ENV = "RUNBOOKS_PUSHGATEWAY_URL"
JOB = "runbooks"
PUSH_TIMEOUT = 5.0

log = logging.getLogger("runbooks.metrics")


@dataclass(frozen=True)
class RunMetrics:
    """What one finished run pushes: metric name -> (help, value)."""

    runbook: str
    values: Mapping[str, tuple[str, float]]

    def registry(self) -> CollectorRegistry:
        """The values as gauges in a registry of their own (what ``push_metrics`` sends)."""
        registry = CollectorRegistry()
        for name, (help_text, value) in sorted(self.values.items()):
            Gauge(name, help_text, registry=registry).set(value)
        return registry

    def exposition(self) -> str:
        """Prometheus text format (what the Pushgateway takes)."""
        return generate_latest(self.registry()).decode()


def run_metrics(runbook: str, *, success: bool, finished_at: float, duration_seconds: float | None,
                size_bytes: int | None = None) -> RunMetrics:
    """The metrics one run pushes (pure)."""
    values: dict[str, tuple[str, float]] = {
        "runbooks_last_run_timestamp_seconds": ("When the last run of this runbook finished.", finished_at),
        "runbooks_last_run_success": ("1 if the last run of this runbook completed, 0 if it failed.",
                                      1.0 if success else 0.0),
    }
    if success:
        values["runbooks_last_success_timestamp_seconds"] = ("When the last successful run finished.", finished_at)
        if duration_seconds is not None:
            values["runbooks_last_run_duration_seconds"] = ("Duration of the last successful run.",
                                                            float(duration_seconds))
        if size_bytes is not None:
            values["runbooks_last_run_size_bytes"] = ("Bytes the last successful run stored.", float(size_bytes))
    else:
        values["runbooks_last_failure_timestamp_seconds"] = ("When the last failed run finished.", finished_at)
    return RunMetrics(runbook, values)


def push_run_metrics(metrics: RunMetrics, gateway: str | None = None) -> bool:
    """POST (replace only these metric names) to the Pushgateway; False, logged, if it could not be done."""
    return push_metrics(metrics.runbook, metrics.registry(), len(metrics.values), gateway)


def push_metrics(runbook: str, registry: CollectorRegistry, count: int, gateway: str | None = None) -> bool:
    """POST a registry to the runbook's Pushgateway group (``job="runbooks", runbook=<name>``), replacing only
    the metric names it holds; False, logged, if it could not be done."""
    gateway = gateway or os.environ.get(PUSHGATEWAY_ENV)
    if not gateway:
        return False
    where = urllib.parse.urlsplit(gateway).netloc or gateway
    try:
        pushadd_to_gateway(gateway, job=JOB, registry=registry, grouping_key={"runbook": runbook},
                           timeout=PUSH_TIMEOUT)
    except OSError as exc:  # URLError, an HTTP error status, a refused connection
        log.warning("could not push metrics of %s to the Pushgateway %s: %s", runbook, where, exc)
        return False
    log.info("pushed %d metrics of %s to %s", count, runbook, where)
    return True


def findings_registry(counts: Mapping[str, int], *, remediated: int, checked_at: float) -> CollectorRegistry:
    """db-integrity-check's own metrics (pure): findings still open by severity, changes made, when it ran."""
    registry = CollectorRegistry()
    findings = Gauge("runbooks_integrity_findings", "Findings of the last db-integrity-check run still open, "
                     "by severity.", ["severity"], registry=registry)
    for severity, n in sorted(counts.items()):
        findings.labels(severity).set(n)
    Gauge("runbooks_integrity_remediations", "Changes the last db-integrity-check run made successfully.",
          registry=registry).set(remediated)
    Gauge("runbooks_integrity_last_check_timestamp_seconds", "When db-integrity-check last finished.",
          registry=registry).set(checked_at)
    return registry


def _size_of(result: Any) -> int | None:
    """The stored size a flow result reports (``BackupResult.size`` and the like), if any."""
    for attribute in ("size", "size_bytes", "bytes"):
        value = getattr(result, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _duration(flow_run: Any, finished_at: float) -> float | None:
    if getattr(flow_run, "total_run_time", None):
        return flow_run.total_run_time.total_seconds() or None
    start = getattr(flow_run, "start_time", None)
    return max(0.0, finished_at - start.timestamp()) if start else None


def push_flow_run_metrics(flow: Any, flow_run: Any, state: Any) -> None:
    """A Prefect flow state hook (on_completion / on_failure / on_crashed) that pushes the run's metrics."""
    finished_at = time.time()
    success = bool(state.is_completed())
    size = None
    if success:
        try:
            size = _size_of(state.result(raise_on_failure=False))
        except Exception:  # noqa: BLE001 - a result that cannot be read (not persisted) only loses the size
            size = None
    push_run_metrics(run_metrics(flow.name, success=success, finished_at=finished_at,
                                 duration_seconds=_duration(flow_run, finished_at), size_bytes=size))


def runbook_metrics_hooks() -> dict[str, list[Callable[..., None]]]:
    """Keyword arguments for ``@flow(...)``: push metrics when a run completes, fails or crashes.

    Combine with a flow's own hooks by concatenating the lists, e.g.
    ``@flow(name="backup", on_completion=[push_flow_run_metrics], on_failure=[_notify, push_flow_run_metrics])``.
    """
    return {"on_completion": [push_flow_run_metrics], "on_failure": [push_flow_run_metrics],
            "on_crashed": [push_flow_run_metrics]}
