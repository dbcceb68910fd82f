"""Typed errors: each says what went wrong, where, and what was left untouched.

Transient failures (connection reset, 5xx) are left to the task's ``retries``; these are the permanent
ones an operator has to act on. No message ever contains a secret.
"""


class RunbookError(Exception):
    """Base class of every error a runbook raises on purpose."""


class ConfigurationError(RunbookError):
    """Bad input: rejected before anything was changed."""


class ConnectionFailed(RunbookError):
    """A service could not be reached or refused the credentials."""


class StoreError(RunbookError):
    """The backup store failed; the message names the store and the object."""


class StagingCancelled(StoreError):
    """A download into staging was told to stop: the run that wanted it is ending."""


class ObjectExists(StoreError):
    """Refused to overwrite an object that already holds different content."""


class DumpFailed(RunbookError):
    """A dump tool exited non-zero or was killed; nothing was listed as a backup."""


class ChecksumMismatch(RunbookError):
    """Stored bytes differ from what the manifest recorded."""


class BackupNotFound(RunbookError):
    """No complete backup set (one with a manifest) has that id."""


class RestoreFailed(RunbookError):
    """A restore step failed; the message says what was left in place."""


class VerificationFailed(RunbookError):
    """Restored data differs from what the manifest recorded."""


class PreflightFailed(ConfigurationError):
    """A server is not set up for what the runbook needs; nothing was changed. The message says what to set."""


class BaseBackupFailed(RunbookError):
    """A physical base backup could not be taken or completed; no manifest was written, so it does not exist."""


class WalMissing(RestoreFailed):
    """A WAL file the restore needs is not in the archive; the message names it."""


class AmcheckFailed(RunbookError):
    """pg_amcheck could not check (a connection or pattern error), as opposed to finding corruption."""


class IntegrityCheckFailed(RunbookError):
    """db-integrity-check found problems at or above its fail_on severity; ``report`` holds every finding."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report
