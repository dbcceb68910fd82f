"""Starting the restored cluster and following its log until recovery ends (or fails, and why)."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from blocks.errors import RestoreFailed, WalMissing
from tasks.log import run_logger
from tasks.pitr.planning import RestorePlan
from tasks.scratch import ScratchPostgres
from tasks.wal import RecoveryLog, RecoveryTarget, parse_recovery_log


@task(retries=0, cache_policy=NO_CACHE)
def start_restored_cluster(
    target_dir: str, port: int, *, timeout_seconds: float = 3600, gap: str | None = None,
) -> int:
    """Start the restored cluster as its OS user (``pg_ctl -w``); it replays WAL from the archive.

    ``gap``: a segment the plan found missing, named if recovery fails."""
    server = ScratchPostgres.adopt(target_dir, port=port, start_timeout=timeout_seconds)
    try:
        server.start()
    except RuntimeError as exc:
        raise _failed(Path(target_dir), str(exc), gap) from None
    pid = server.postmaster_pid()
    run_logger().info("restored cluster in %s started on port %d (pid %s)", server.data_dir, port, pid)
    return int(pid or 0)


def _failed(base: Path, fallback: str, gap: str | None) -> RestoreFailed:
    message = _recovery_failure(base, fallback)
    if gap:
        return WalMissing(f"{message}. WAL segment {gap} is missing from the archive: recovery could not get "
                          "past it")
    return RestoreFailed(message)


def _recovery_failure(base: Path, fallback: str) -> str:
    log = parse_recovery_log(_read_log(base))
    if log.fatal:
        missing = [f for f in log.restore_failures if "not in the archive" in f]
        where = f"; last file asked for and not in the archive: {missing[-1].split()[0]}" if missing else ""
        return f"recovery in {base / 'data'} failed: {log.fatal[-1]}{where}. See {base / 'server.log'}"
    return fallback


def _read_log(base: Path) -> str:
    try:
        return (base / "server.log").read_text(errors="replace")
    except OSError:
        return ""


class RecoveryOutcome(BaseModel):
    """Where recovery stopped, as the server log tells it."""

    state: str = Field(description="promoted, paused or shut down")
    stopped_at: str | None
    stop_time: str | None
    stop_lsn: str | None
    redo_done_lsn: str | None
    last_transaction_time: str | None
    timeline: int | None
    last_restored: str | None
    seconds: float


@task(retries=0, cache_policy=NO_CACHE)
def wait_for_recovery(
    target_dir: str, *, action: str = "promote", timeout_seconds: float = 3600, gap: str | None = None,
) -> RecoveryOutcome:
    """Follow the server log until recovery ends: promoted, paused or shut down at the target, or failed."""
    base = Path(target_dir)
    server = ScratchPostgres.adopt(target_dir, port=0)
    started = time.monotonic()
    log = RecoveryLog()
    while time.monotonic() - started < timeout_seconds:
        log = parse_recovery_log(_read_log(base))
        done = {"promote": log.ready, "pause": log.paused, "shutdown": log.shut_down}.get(action, False)
        if done:
            break
        if log.fatal or not server.is_running():
            if action == "shutdown" and log.shut_down:
                break
            raise _failed(base, "the restored server stopped during recovery", gap)
        time.sleep(0.2)
    else:
        raise RestoreFailed(f"recovery in {base / 'data'} did not end within {timeout_seconds:.0f} s; it is still "
                            f"running (see {base / 'server.log'})")
    state = {"promote": "promoted", "pause": "paused", "shutdown": "shut down"}[action]
    outcome = RecoveryOutcome(state=state, stopped_at=log.stopped_at, stop_time=log.stop_time,
                              stop_lsn=log.stop_lsn, redo_done_lsn=log.redo_done_lsn,
                              last_transaction_time=log.last_transaction_time, timeline=log.new_timeline,
                              last_restored=log.restored[-1] if log.restored else None,
                              seconds=round(time.monotonic() - started, 3))
    run_logger().info("recovery of %s %s: %s", base / "data", state, outcome.stopped_at or
                      f"end of archive, redo done at {outcome.redo_done_lsn}")
    return outcome


def target_problems(outcome: RecoveryOutcome, target: RecoveryTarget, plan: RestorePlan) -> list[str]:
    """Why the recovery did not reach its target (empty: it did)."""
    if target.kind in ("time", "lsn", "name") and outcome.stopped_at is None:
        return [f"recovery ended (redo done at {outcome.redo_done_lsn}) without reaching {target.describe()}"
                + (f"; WAL segment {plan.gap} is missing from the archive" if plan.gap else "")]
    if target.kind == "name" and target.name and f'"{target.name}"' not in (outcome.stopped_at or ""):
        return [f"recovery stopped {outcome.stopped_at}, not at restore point {target.name!r}"]
    if target.kind == "latest" and plan.last_segment and (outcome.last_restored or "")[8:] < plan.last_segment[8:]:
        return [f"recovery replayed up to {outcome.last_restored}, but the archive holds WAL up to "
                f"{plan.last_segment}"]
    return []
