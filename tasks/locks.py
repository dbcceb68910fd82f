"""Per-target locks: Prefect global concurrency limits of one slot, created on first use."""

from __future__ import annotations

import hashlib
import re
import time
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound


def lock_name(runbook: str, target: str) -> str:
    """A concurrency-limit name for one target (Prefect forbids / % & > < in names)."""
    readable = re.sub(r"[/%&><\s]+", "_", target).strip("_")[-60:]
    return f"{runbook}:{readable}:{hashlib.sha1(target.encode()).hexdigest()[:8]}"


def ensure_lock(name: str) -> None:
    """Make sure a one-slot global concurrency limit called ``name`` exists (never changes one that does).

    A plain call, not a task: a task run's own records reach a SQLite-backed Prefect server just as the
    flow asks for the slot, the slot's UPDATE then meets "database is locked", and the client's retry
    backs off 2 s (measured: 3 of 4 acquisitions took 1.8-2.4 s instead of 0.02 s). The client still
    retries transient API errors itself.
    """
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass


def wait_until_recorded(task_run_id: UUID | None, timeout: float = 5.0) -> None:
    """Wait, ``timeout`` seconds at most, until the Prefect server has recorded ``task_run_id``'s final state.

    A plain call, for just before a lock: the server writes a finished task run's records a little after
    the task returns (0.05-0.2 s here), and on a SQLite-backed server a slot asked for meanwhile meets
    "database is locked"; the client then backs off 2 s or more (measured: 3 of 4 acquisitions took 1.9-5.5 s
    after a task, 0.01-0.08 s once its records were in).
    """
    if task_run_id is None:
        return
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                run = client.read_task_run(task_run_id)
            except ObjectNotFound:
                run = None
            if run is not None and run.state is not None and run.state.is_final():
                return
            time.sleep(0.02)
