"""Run external tools as argv lists, streaming their stdout or stdin, keeping stderr for the error."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache
from types import TracebackType
from typing import IO, Any, Self

from blocks.errors import ConfigurationError

# Only these variables of our own environment reach child tools; the rest (tokens, API keys) stay here.
_PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGPASSFILE")


@cache
def pg_bindir() -> str | None:
    """Folder of the PostgreSQL client/server binaries: $RUNBOOKS_PG_BINDIR, else ``pg_config --bindir``."""
    configured = os.environ.get("RUNBOOKS_PG_BINDIR")
    if configured:
        return configured
    pg_config = shutil.which("pg_config")
    if pg_config:
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    return None


def pg_tool(name: str) -> str:
    """Absolute path of a PostgreSQL tool (pg_dump, pg_restore, psql, ...)."""
    bindir = pg_bindir()
    if bindir and os.access(os.path.join(bindir, name), os.X_OK):
        return os.path.join(bindir, name)
    found = shutil.which(name)
    if not found:
        raise ConfigurationError(f"{name} not found: install the PostgreSQL client or set RUNBOOKS_PG_BINDIR")
    return found


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _PASSTHROUGH}
    env.update(extra)
    return env


@cache
def tool_version(path: str) -> str:
    done = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


@dataclass
class Child:
    """A running tool: its Popen and the stderr collected so far (bounded)."""

    proc: subprocess.Popen[bytes]
    stderr_lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    @property
    def stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def wait(self) -> int:
        """Wait for the tool to exit and for its stderr to be read; returns the exit code."""
        code = self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
        return code

    def stderr_tail(self, lines: int = 15) -> str:
        return "\n".join(self.stderr_lines[-lines:]).strip()


@contextmanager
def spawn(
    argv: list[str],
    *,
    env: Mapping[str, str],
    stdin: bool = False,
    stdout: bool = True,
    redact: Callable[[str], str] = lambda s: s,
    on_stderr: Callable[[str], None] | None = None,
) -> Iterator[Child]:
    """Start ``argv`` (never a shell); stderr is drained in a thread so the pipes cannot deadlock, and each
    of its lines is passed to ``on_stderr`` as it arrives (a tool's progress, say).

    On leaving, the child is waited for; if the block raised, it is killed first.
    """
    proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
        argv,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=child_env(env),
    )
    child = Child(proc)

    def drain() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = redact(raw.decode(errors="replace").rstrip())
            if on_stderr is not None:
                on_stderr(line)
            child.stderr_lines.append(line)
            if len(child.stderr_lines) > 200:
                del child.stderr_lines[:100]

    child._reader = threading.Thread(target=drain, daemon=True)
    child._reader.start()
    try:
        yield child
    except BaseException:
        proc.kill()
        raise
    finally:
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()
                except OSError:
                    pass
        proc.wait()
        child._reader.join(timeout=10)


def run(argv: list[str], *, env: Mapping[str, str], input_bytes: bytes | None = None) -> tuple[int, str, str]:
    """Run a short tool to completion; returns (exit code, stdout, stderr)."""
    done = subprocess.run(  # noqa: S603 - argv list, no shell
        argv, input=input_bytes, capture_output=True, env=child_env(env), check=False
    )
    return done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")


def describe_exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


class Service:
    """Something a test, a drill or the demo starts and stops (a scratch server, the S3 sandbox, a fault proxy):
    ``start()`` returns once it serves, ``stop()`` is safe to call twice; as a context manager it is started on
    entry and stopped on exit."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None:
        self.stop()


def stop_process(proc: subprocess.Popen[Any], *, timeout: float, group: bool = False) -> bool:
    """SIGTERM ``proc``, SIGKILL it if it has not exited after ``timeout`` seconds, and reap it. With ``group``
    (a child started with ``start_new_session=True``) the signals go to its process group, and whatever the
    leader left in the group is killed as well. Returns True when SIGKILL was needed. Safe to call twice."""

    def send(signum: int) -> None:
        with suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(proc.pid, signum)
            elif proc.poll() is None:
                proc.send_signal(signum)

    killed = False
    if proc.poll() is None:
        send(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            killed = True
    if group:
        send(signal.SIGKILL)  # the rest of the group: a flow run's subprocess, uvicorn workers, weed's children
    with suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    return killed
