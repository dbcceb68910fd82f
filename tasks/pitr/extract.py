"""The restore target checked, and a base backup extracted into it and verified with pg_verifybackup."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tarfile
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from blocks.errors import ConfigurationError, RestoreFailed, VerificationFailed
from blocks.store import BackupStore
from tasks.log import run_logger
from tasks.manifest import BACKUP_MANIFEST, Part, human_size
from tasks.process import describe_exit, pg_tool, run
from tasks.retry import retry_unless_permanent
from tasks.scratch import LOOPBACK
from tasks.stream import open_decompressed_reader

_OS_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def check_os_user(name: str) -> str:
    """An existing OS account with a plain POSIX name (it reaches ``runuser -u`` and chown)."""
    import pwd

    if not _OS_USER.match(name):
        raise ConfigurationError(f"os_user {name[:64]!r} is not a POSIX user name ([a-z_][a-z0-9_-]*); "
                                 "nothing was changed")
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise ConfigurationError(f"os_user {name!r} does not exist on this host; nothing was changed") from None
    return name


@task(retries=0, cache_policy=NO_CACHE)
def check_restore_target(target_dir: str, port: int, *, os_user: str = "postgres") -> str:
    """A restore never goes over anything: ``target_dir`` must be new or empty, ``port`` free on 127.0.0.1,
    ``os_user`` an existing account."""
    if any(ord(c) < 32 or ord(c) == 127 for c in target_dir):
        raise ConfigurationError(f"target_dir {target_dir[:200]!r} has control characters; nothing was changed")
    path = Path(target_dir)
    if not path.is_absolute() or ".." in path.parts:
        raise ConfigurationError(f"target_dir {target_dir!r} must be an absolute path without '..'")
    check_os_user(os_user)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigurationError(f"{target_dir} exists and is not empty: a restore only goes into a new directory "
                                 "(nothing was changed)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        if probe.connect_ex((LOOPBACK, port)) == 0:
            raise ConfigurationError(f"port {port} on {LOOPBACK} is in use: choose a free port (nothing was changed)")
    return str(path)


class Extracted(BaseModel):
    data_dir: str
    files: int
    bytes: int
    seconds: float


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE, retry_condition_fn=retry_unless_permanent)
def extract_base_backup(store: BackupStore, part: Part, target_dir: str, *, os_user: str = "postgres") -> Extracted:
    """Stream the base backup out of the store into ``target_dir/data`` (owned by ``os_user``, mode 0700).

    The stored sha256 is checked as the stream ends; on any failure the new data directory is removed.
    """
    started = time.monotonic()
    client = store.get_client()
    base = Path(target_dir)
    data = base / "data"
    base.mkdir(mode=0o755, parents=True, exist_ok=True)
    data.mkdir(mode=0o700)
    files = total = 0
    try:
        with open_decompressed_reader(client, part.key, sha256=part.sha256, size=part.size) as src, \
                tarfile.open(fileobj=src, mode="r|") as archive:
            for member in archive:
                if member.issym() or member.islnk():
                    raise RestoreFailed(f"{part.key}: holds a link ({member.name}); tablespaces are not supported")
                archive.extract(member, data, filter="data")
                if member.isfile():
                    files += 1
                    total += member.size
        for name in ("pg_wal/archive_status",):
            (data / name).mkdir(parents=True, exist_ok=True)
        (base / "socket").mkdir(exist_ok=True)
        if os.geteuid() == 0:
            for path in [base, base / "socket", *data.rglob("*"), data]:
                shutil.chown(path, os_user, os_user)
        data.chmod(0o700)
    except BaseException:
        shutil.rmtree(data, ignore_errors=True)
        raise
    seconds = round(time.monotonic() - started, 3)
    run_logger().info("extracted %s into %s: %d files, %s in %.1f s", part.key, data, files, human_size(total), seconds)
    return Extracted(data_dir=str(data), files=files, bytes=total, seconds=seconds)


@task(retries=0, cache_policy=NO_CACHE)
def verify_restored_files(data_dir: str) -> int:
    """``pg_verifybackup --no-parse-wal``: every file of the new data directory against backup_manifest."""
    code, out, err = run([pg_tool("pg_verifybackup"), "--no-parse-wal", data_dir], env={})
    if code != 0:
        raise VerificationFailed(f"pg_verifybackup of {data_dir} failed ({describe_exit(code)}): "
                                 f"{(err or out).strip()[-1500:]}")
    files = len(json.loads((Path(data_dir) / BACKUP_MANIFEST).read_text()).get("Files", []))
    run_logger().info("pg_verifybackup: %d files of %s match backup_manifest", files, data_dir)
    return files
