"""Which failures a task's ``retries`` should retry: transient ones only.

A checksum mismatch, bad input or a missing backup fails the same way every time; retrying it only
delays the operator. Everything else (connection resets, 5xx, a killed dump) is retried.
"""

from __future__ import annotations

from typing import Any

from blocks.errors import (
    BackupNotFound,
    ChecksumMismatch,
    ConfigurationError,
    ObjectExists,
    RestoreFailed,
    StagingCancelled,
    VerificationFailed,
)

PERMANENT = (BackupNotFound, ChecksumMismatch, ConfigurationError, ObjectExists, StagingCancelled, VerificationFailed)


def retry_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """``retry_condition_fn`` for Prefect tasks: False for the permanent errors above."""
    try:
        state.result()
    except PERMANENT:
        return False
    except Exception:  # noqa: BLE001 - anything else is worth another try
        return True
    return True


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_transient``, and never after a failed restore check (a missing WAL segment stays missing)."""
    try:
        state.result()
    except RestoreFailed:
        return False
    except Exception:  # noqa: BLE001 - judged by retry_transient below
        pass
    return retry_transient(task, task_run, state)
