"""TLS material of a Block as files for libpq, redis-cli and ssl: PEM text is written once per process into a
private directory (0700, files 0600 whatever the umask) removed at exit; a file path is used as it is."""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

_DIR: Path | None = None
_LOCK = threading.Lock()


def pem_file(value: str, *, secret: bool = False) -> str:
    """``value`` as a file path: PEM text (it holds ``-----BEGIN``) written to a private file, else the path."""
    global _DIR
    if "-----BEGIN" not in value:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:24]
    with _LOCK:
        if _DIR is None or not _DIR.is_dir():
            _DIR = Path(tempfile.mkdtemp(prefix="runbooks-tls-"))
            os.chmod(_DIR, 0o700)
            atexit.register(shutil.rmtree, _DIR, True)
        path = _DIR / f"{'key' if secret else 'cert'}-{digest}.pem"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                os.fchmod(handle.fileno(), 0o600)
                handle.write(value if value.endswith("\n") else value + "\n")
            os.replace(tmp, path)
    return str(path)
