"""Checks of flow parameters that reach a tool, SQL or the file system: pure functions, a clear error before
anything changes. (Tools get argv lists, never a shell; these keep values to what each place can hold.)"""

from __future__ import annotations

from pathlib import PurePosixPath

from blocks.errors import ConfigurationError


def _control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def check_local_path(parameter: str, value: str) -> str:
    """An absolute path without ``..`` segments, NUL or control characters (it is opened on this host)."""
    if not value or _control(value):
        raise ConfigurationError(f"{parameter} {value[:200]!r}: empty, or holds a control character; nothing was "
                                 "changed")
    path = PurePosixPath(value)
    if not path.is_absolute() or ".." in path.parts:
        raise ConfigurationError(f"{parameter} {value[:200]!r} must be an absolute path without '..'; nothing was "
                                 "changed")
    return value


def check_database_name(value: str) -> str:
    """A PostgreSQL database name: 1 to 63 bytes, no NUL or control characters (quotes and spaces are fine)."""
    if not value or len(value.encode()) > 63 or _control(value):
        raise ConfigurationError(f"database name {value[:80]!r}: 1 to 63 bytes without control characters; "
                                 "nothing was changed")
    return value


def check_tag(value: str) -> str:
    """A tag of a backup set: 1 to 100 printable characters (it reaches manifests, artifacts and the UI)."""
    if not value or len(value) > 100 or not value.isprintable():
        raise ConfigurationError(f"tag {value[:80]!r}: 1 to 100 printable characters; nothing was changed")
    return value
