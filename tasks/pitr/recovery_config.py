"""The restored cluster's recovery settings, and a trial run of its restore_command."""

from __future__ import annotations

import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.errors import ConfigurationError, RestoreFailed
from tasks.log import run_logger
from tasks.pitr.extract import check_os_user
from tasks.process import describe_exit
from tasks.scratch import LOOPBACK
from tasks.wal import parse_wal_name, restore_command_argv


def _conf_line(key: str, value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigurationError(f"{key}: a control character (e.g. a newline) cannot go into postgresql.auto.conf")
    return f"{key} = '" + value.replace("\\", "\\\\").replace("'", "''") + "'"


_MINIMAL_HBA = """# written by runbooks pitr-restore: the backup held no pg_hba.conf (it lived elsewhere)
local   all   all                 peer
host    all   all   127.0.0.1/32  scram-sha-256
"""


@task(retries=0, cache_policy=NO_CACHE)
def configure_recovery(
    target_dir: str, settings: dict[str, str], *, port: int, keep_archiving: bool = True, os_user: str = "postgres",
) -> list[str]:
    """Write the recovery settings, port, loopback address and a log we can read into postgresql.auto.conf
    (read last, so they win), and ``recovery.signal``. Returns notes on anything else that had to be added."""
    base = Path(target_dir)
    data = base / "data"
    notes = []
    if not (data / "postgresql.conf").exists():
        (data / "postgresql.conf").write_text("# written by runbooks pitr-restore: the backup held none\n")
        notes.append("the backup held no postgresql.conf (Debian keeps it in /etc): an empty one was written")
    if not (data / "pg_hba.conf").exists():
        (data / "pg_hba.conf").write_text(_MINIMAL_HBA)
        notes.append("the backup held no pg_hba.conf: local peer and 127.0.0.1 scram-sha-256 allowed")
    overrides = {
        "port": str(port),
        "listen_addresses": LOOPBACK,
        "unix_socket_directories": str(base / "socket"),
        # The log goes to pg_ctl's file, in English, so the runbook can tell where recovery stopped.
        "logging_collector": "off",
        "lc_messages": "C",
        **settings,
    }
    if not keep_archiving:
        overrides["archive_mode"] = "off"
        notes.append("archive_mode = off: the restored cluster does not archive")
    lines = ["", f"# added by runbooks pitr-restore at {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC"]
    lines += [_conf_line(k, v) for k, v in overrides.items()]
    with (data / "postgresql.auto.conf").open("a") as conf:
        conf.write("\n".join(lines) + "\n")
    (data / "standby.signal").unlink(missing_ok=True)
    (data / "recovery.signal").write_text("")
    if os.geteuid() == 0:
        for name in ("postgresql.auto.conf", "postgresql.conf", "pg_hba.conf", "recovery.signal"):
            shutil.chown(data / name, os_user, os_user)
    run_logger().info("recovery settings written to %s/postgresql.auto.conf: %s", data,
                      ", ".join(f"{k}={v}" for k, v in settings.items() if k != "restore_command"))
    return notes


@task(retries=0, cache_policy=NO_CACHE)
def check_restore_command(restore_command: list[str], data_dir: str, segment: str, *,
                          os_user: str = "postgres") -> float:
    """Run restore_command as PostgreSQL will (the OS user, in the data directory) for the first segment the
    restore needs: proves the command, its configuration and its permissions before the server starts.
    ``restore_command`` is the checked argv template (``restore_command_argv``); no shell runs it here."""
    import subprocess

    probe = "pg_wal/RUNBOOKS_PROBE"
    template = restore_command_argv(restore_command)
    parse_wal_name(segment)
    argv = [probe if word == "%p" else segment if word == "%f" else word for word in template]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", check_os_user(os_user), "--", *argv]
    started = time.monotonic()
    done = subprocess.run(argv, cwd=data_dir, capture_output=True, text=True, timeout=300, check=False)  # noqa: S603
    seconds = time.monotonic() - started
    fetched = Path(data_dir) / probe
    shown = " ".join(template)
    try:
        if done.returncode != 0 or not fetched.is_file():
            raise RestoreFailed(f"restore_command {shown!r} failed for {segment} as {os_user} "
                                f"({describe_exit(done.returncode)}): {done.stderr.strip()[-800:]}")
    finally:
        fetched.unlink(missing_ok=True)
    run_logger().info("restore_command fetched %s as %s in %.2f s", segment, os_user, seconds)
    return round(seconds, 3)
