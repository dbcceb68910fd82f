"""Steps on a host over SSH: run one command (an argv list, every argument quoted with shlex.quote), read a
file, write a file atomically (SFTP to a temporary name beside it, then rename over it)."""

from __future__ import annotations

import posixpath
import secrets
import shlex
import stat
from dataclasses import dataclass

import paramiko
from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.errors import ConnectionFailed, RunbookError
from blocks.ssh import SSHHost
from tasks.log import run_logger


class RemoteCommandFailed(RunbookError):
    """A command on the host exited non-zero; the message has its argv and the end of its stderr."""


@dataclass(frozen=True)
class CommandResult:
    argv: list[str]
    exit_code: int
    stdout: str
    stderr: str


def remote_command(argv: list[str]) -> str:
    """The command line the remote shell runs: every argument quoted, so none is interpreted."""
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv must be a non-empty list of strings")
    return shlex.join(argv)


@task(cache_policy=NO_CACHE)
def run_remote(host: SSHHost, argv: list[str], *, check: bool = True, timeout_seconds: float = 600) -> CommandResult:
    """Run ``argv`` on the host and wait for it; non-zero raises RemoteCommandFailed when ``check``."""
    command = remote_command(argv)
    with host.connect() as client:
        try:
            _stdin, stdout, stderr = client.exec_command(command, timeout=timeout_seconds)
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            code = stdout.channel.recv_exit_status()
        except (paramiko.SSHException, OSError) as exc:
            raise ConnectionFailed(f"{host.describe()}: `{command}` did not finish: {type(exc).__name__}") from None
    log = run_logger()
    if code != 0 and check:
        tail = err.strip().splitlines()[-5:]
        raise RemoteCommandFailed(f"{host.describe()}: `{command}` exited {code}: {' | '.join(tail) or '(no stderr)'}")
    log.info("%s: `%s` exited %d", host.describe(), command, code)
    return CommandResult(list(argv), code, out, err)


@task(retries=2, retry_delay_seconds=[1, 3], cache_policy=NO_CACHE)
def read_remote_file(host: SSHHost, path: str) -> str | None:
    """The file's text, or None when it does not exist."""
    with host.connect() as client, client.open_sftp() as sftp:
        try:
            with sftp.open(path, "r") as handle:
                return handle.read().decode()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RunbookError(f"{host.describe()}: cannot read {path}: {exc}") from None


def read_remote_file_for_report(host: SSHHost, path: str, when: str) -> str | None:
    """``read_remote_file`` for a report written even when the host is gone: a failure is logged (``could not
    read PATH WHEN``) and gives None."""
    try:
        return read_remote_file(host, path)
    except Exception as exc:  # noqa: BLE001 - the report is written even when the host is gone
        run_logger().error("could not read %s %s: %s", path, when, exc)
        return None


@task(cache_policy=NO_CACHE)
def write_remote_file(host: SSHHost, path: str, content: str, *, mode: int = 0o644) -> None:
    """Replace the file atomically: write a temporary file beside it, then rename it over the file (POSIX
    rename). A reader sees the old content or the new, never a mixture; a failure leaves the old file as it
    was. An existing file keeps its permission bits; a new one gets ``mode``."""
    temp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.runbooks-{secrets.token_hex(4)}")
    with host.connect() as client, client.open_sftp() as sftp:
        try:
            mode = stat.S_IMODE(sftp.stat(path).st_mode or mode)
        except FileNotFoundError:
            pass
        try:
            with sftp.open(temp, "w") as handle:
                handle.write(content.encode())
                handle.flush()
            sftp.chmod(temp, mode)
            sftp.posix_rename(temp, path)
        except OSError as exc:
            try:
                sftp.remove(temp)
            except OSError:
                pass
            raise RunbookError(f"{host.describe()}: cannot write {path}: {exc}; the file is unchanged") from None
    run_logger().info("%s: %s replaced atomically (%d bytes)", host.describe(), path, len(content.encode()))
