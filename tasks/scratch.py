"""Temporary PostgreSQL clusters on loopback, for restore drills and tests (Redis: tasks/scratch_redis.py),
and the helpers both use.

Each server lives in its own temp dir, listens on 127.0.0.1 only and is removed by ``stop()``.
Secrets go through files inside that dir (initdb ``--pwfile``), never argv.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self
from urllib.parse import quote

from tasks.process import Service, pg_bindir

LOOPBACK = "127.0.0.1"
_LOG_TAIL_LINES = 40
# Log lines that mean "someone took the port between free_port() and bind()": worth a retry.
_PORT_TAKEN_MARKERS = ("Address already in use", "could not bind", "could not create any TCP/IP sockets")


def started_dir(tmp: Path | None, service: object) -> Path:
    """A scratch server's temp dir, which exists only while it is started."""
    if tmp is None:
        raise RuntimeError(f"{type(service).__name__} is not started")
    return tmp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def port_was_taken(log_text: str) -> bool:
    return any(marker in log_text for marker in _PORT_TAKEN_MARKERS)


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a killed postmaster is reaped by init, not us)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may itself contain spaces.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _conf_quote(value: str) -> str:
    """Quote a value for postgresql.conf: single quotes, embedded quotes doubled."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class ScratchPostgres(Service):
    """A throwaway PostgreSQL cluster on 127.0.0.1 (superuser ``postgres``, scram password over TCP).

    Run as root, the cluster belongs to the ``postgres`` OS user and every server command goes
    through ``runuser -u postgres --`` (PostgreSQL refuses to run as root).
    ``fast=True`` turns fsync off: only for clusters whose data nobody needs after a crash.
    ``data_checksums=False`` creates the cluster without page checksums (initdb without ``-k``), as many
    production clusters are: corruption must then be found by reading the pages (amcheck), not by checksums.
    """

    OS_USER = "postgres"
    SUPERUSER = "postgres"

    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        bindir: str | None = None,
        settings: dict[str, str] | None = None,
        base_dir: str | None = None,
        fast: bool = False,
        data_checksums: bool = True,
        start_timeout: float = 60.0,
        ssl_cert_file: str | None = None,
        ssl_key_file: str | None = None,
        ssl_client_ca_file: str | None = None,
    ) -> None:
        """``password=None`` generates a random one; ``port=None`` picks a free port at start.

        ``ssl_cert_file``/``ssl_key_file``: TLS on (copied into the data directory for the server's OS user);
        ``ssl_client_ca_file`` as well: TCP connections must use TLS and present a client certificate signed
        by that CA (``hostssl ... clientcert=verify-full``), plain TCP is rejected."""
        if password is not None and ("\n" in password or "\r" in password or not password):
            raise ValueError("the scratch superuser password must be one non-empty line (initdb --pwfile)")
        self._port_given = port is not None
        self._port = port if port is not None else 0
        self._password = password if password is not None else secrets.token_urlsafe(18)
        self._bindir: Path | None = Path(bindir) if bindir else None
        self._settings = dict(settings or {})
        self._base_dir = base_dir
        self._fast = fast
        self._data_checksums = data_checksums
        self._start_timeout = start_timeout
        if (ssl_cert_file is None) != (ssl_key_file is None) or (ssl_client_ca_file and not ssl_cert_file):
            raise ValueError("ssl_cert_file and ssl_key_file go together (and ssl_client_ca_file needs them)")
        self._ssl = (ssl_cert_file, ssl_key_file, ssl_client_ca_file) if ssl_cert_file else None
        self._tmp: Path | None = None
        self._adopted = False

    @classmethod
    def adopt(cls, base: str | os.PathLike[str], *, port: int, start_timeout: float = 60.0) -> ScratchPostgres:
        """Run a cluster whose data directory already exists at ``base/data`` (one restored from a base
        backup, say) and whose configuration already listens on 127.0.0.1:``port``.

        Nothing is written to its configuration; ``stop()`` stops it and leaves ``base`` in place.
        """
        server = cls(port, password="adopted-cluster-password-unknown", start_timeout=start_timeout)
        server._tmp = Path(base)
        server._adopted = True
        return server

    def __repr__(self) -> str:
        # No password here: reprs end up in logs and pytest output.
        return f"ScratchPostgres(port={self._port}, data_dir={self._tmp and self.data_dir})"

    # -- properties -------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        return self._port

    @property
    def password(self) -> str:
        return self._password

    @property
    def user(self) -> str:
        return self.SUPERUSER

    @property
    def bindir(self) -> Path:
        """Directory holding initdb, pg_ctl, pg_dump ... of the server version in use."""
        if self._bindir is None:
            self._bindir = _find_pg_bindir()
        return self._bindir

    @property
    def base(self) -> Path:
        return started_dir(self._tmp, self)

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base / "socket"

    @property
    def log_file(self) -> Path:
        return self.base / "server.log"

    @property
    def url(self) -> str:
        """libpq URL with the password in it: for tests and the demo only, never log it."""
        return f"postgresql://{self.SUPERUSER}:{quote(self._password, safe='')}@{LOOPBACK}:{self._port}/postgres"

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> Self:
        """Create the cluster (first time only) and start it; returns once it accepts connections."""
        for binary in ("initdb", "pg_ctl", "pg_isready", "postgres"):
            if not (self.bindir / binary).is_file():
                raise RuntimeError(
                    f"{binary} not found in {self.bindir}: install the PostgreSQL server package "
                    "(postgresql-15, see `make system-deps`) or pass bindir="
                )
        created_here = self._tmp is None
        try:
            if created_here:
                self._tmp = Path(tempfile.mkdtemp(prefix="scratch-pg-", dir=self._base_dir))
                self._initdb()
            attempts = 1 if self._port_given else 3
            for attempt in range(attempts):
                if not self._port_given and (attempt > 0 or self._port == 0):
                    self._port = free_port()
                if not self._adopted:
                    self._write_settings()
                log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
                try:
                    self._launch()
                    return self
                except RuntimeError:
                    new_log = self.log_file.read_bytes()[log_start:].decode(errors="replace")
                    if attempt + 1 < attempts and port_was_taken(new_log):
                        continue
                    raise
            raise AssertionError("unreachable")
        except BaseException:
            # Never leave a half-started server behind; keep the data dir of a restart after kill().
            if self.is_running():
                self.kill()
            if created_here:
                self._remove_tmp()
            raise

    def stop(self) -> None:
        """Fast shutdown (``pg_ctl stop -m fast``), then remove the temp dir. Safe to call twice."""
        if self._tmp is None:
            return
        try:
            if self.is_running():
                result = self._run_server_cmd(
                    [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60",
                     "stop"],
                    timeout=90,
                )
                if result.returncode != 0 and self.is_running():
                    self.kill()
        finally:
            if self._adopted:
                self._tmp = None  # not ours to remove
            else:
                self._remove_tmp()

    def shutdown(self) -> None:
        """Clean shutdown (``pg_ctl stop -m fast``) that keeps the data dir: ``start()`` runs it again.

        For tests that change the cluster's files while it is down (writing corruption into a relation).
        """
        if not self.is_running():
            return
        result = self._run_server_cmd(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", "stop"],
            timeout=90,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl stop on port {self._port} failed (exit {result.returncode}): "
                               f"{result.stderr.strip()}")

    def kill(self, *, backends: bool = True) -> None:
        """SIGKILL the server, as a crash would (fault tests). The data dir stays, ``start()`` recovers it.

        By default the backends die with the postmaster, as on a host crash or an OOM kill of the whole
        service: every session fails at once. ``backends=False`` kills the postmaster alone; orphaned
        backends then keep serving their sessions until they next wait for something, which is racy.
        """
        pid = self.postmaster_pid()
        if pid is None:
            return
        victims = [pid]
        if backends:
            os.kill(pid, signal.SIGSTOP)  # no new backend can be forked while we list them
            victims += _children(pid)
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_process_alive(v) for v in victims) and time.monotonic() < deadline:
            time.sleep(0.01)

    def postmaster_pid(self) -> int | None:
        """PID of the running postmaster, or None."""
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first_line)
        except (OSError, ValueError, RuntimeError):
            return None
        return pid if _process_alive(pid) else None

    def is_running(self) -> bool:
        return self.postmaster_pid() is not None

    def __enter__(self) -> Self:
        if not self.is_running():
            self.start()
        return self

    # -- internals --------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        # PG* variables of the caller (PGDATA, PGPORT, PGPASSWORD ...) must not leak into the scratch cluster.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _run_server_cmd(self, argv: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        if _running_as_root():
            argv = ["runuser", "-u", self.OS_USER, "--", *argv]
        # cwd inside the temp dir: the postgres user may not be allowed into the caller's cwd (/root).
        return subprocess.run(
            argv, cwd=self.base, env=self._env(), capture_output=True, text=True, timeout=timeout, check=False
        )

    def _initdb(self) -> None:
        base = self.base
        self.socket_dir.mkdir()
        pwfile = base / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self._password + "\n")
        if _running_as_root():
            shutil.chown(base, self.OS_USER, self.OS_USER)
            for path in (self.socket_dir, pwfile):
                shutil.chown(path, self.OS_USER, self.OS_USER)
            reachable = self._run_server_cmd(["test", "-w", str(base)], timeout=30)
            if reachable.returncode != 0:
                raise RuntimeError(
                    f"the {self.OS_USER} OS user cannot reach {base}: a parent directory is not searchable "
                    f"by others (pytest's tmp_path is 0700, for one); use a base_dir such as /tmp"
                )
        argv = [
            str(self.bindir / "initdb"),
            "-D", str(self.data_dir),
            "-U", self.SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E", "UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        if self._data_checksums:
            argv.append("--data-checksums")  # restore drills run pg_amcheck/pg_checksums against them
        if self._fast:
            argv.append("--no-sync")
        try:
            result = self._run_server_cmd(argv, timeout=120)
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-_LOG_TAIL_LINES:])
            raise RuntimeError(f"initdb failed (exit {result.returncode}) in {base}:\n{output}")
        # Our settings live in an included file so a port retry can rewrite them; ALTER SYSTEM still wins.
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude 'scratch.conf'\n")

    def _write_settings(self) -> None:
        settings: dict[str, str] = {
            "listen_addresses": LOOPBACK,
            "port": str(self._port),
            "unix_socket_directories": str(self.socket_dir),
        }
        if self._fast:
            # fsync only: commits still reach the OS at once, so kill() loses nothing (an OS crash would).
            settings["fsync"] = "off"
        if self._ssl is not None:
            settings.update(self._install_tls())
        settings.update(self._settings)
        lines = [f"{key} = {_conf_quote(value)}" for key, value in settings.items()]
        path = self.data_dir / "scratch.conf"
        path.write_text("\n".join(lines) + "\n")
        if _running_as_root():
            shutil.chown(path, self.OS_USER, self.OS_USER)

    def _install_tls(self) -> dict[str, str]:
        assert self._ssl is not None
        cert, key, client_ca = self._ssl
        settings = {"ssl": "on"}
        for name, source, mode in (("server.crt", cert, 0o644), ("server.key", key, 0o600),
                                   ("client-ca.crt", client_ca, 0o644)):
            if source is None:
                continue
            target = self.data_dir / name
            shutil.copyfile(source, target)
            os.chmod(target, mode)
            if _running_as_root():
                shutil.chown(target, self.OS_USER, self.OS_USER)
            settings[{"server.crt": "ssl_cert_file", "server.key": "ssl_key_file",
                      "client-ca.crt": "ssl_ca_file"}[name]] = str(target)
        if client_ca is not None:
            hba = self.data_dir / "pg_hba.conf"
            rules = "".join(f"hostssl {db} all {LOOPBACK}/32 scram-sha-256 clientcert=verify-full\n"
                            f"hostnossl {db} all {LOOPBACK}/32 reject\n" for db in ("all", "replication"))
            text = hba.read_text()
            if not text.startswith(rules):
                hba.write_text(rules + text)
        return settings

    def _launch(self) -> None:
        self._wait_stale_postmaster_reaped()
        # pg_ctl -w polls postmaster.pid until the server reports ready, and notices at once when the
        # postmaster it forked dies (port taken, bad setting); pg_isready then confirms TCP on 127.0.0.1.
        result = self._run_server_cmd(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
             "-w", "-t", str(int(self._start_timeout)), "start"],
            timeout=self._start_timeout + 30,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"pg_ctl start on port {self._port} failed (exit {result.returncode}): {result.stderr.strip()}\n"
                f"server log tail:\n{log_tail(self.log_file)}"
            )
        self._wait_accepting()

    def _wait_stale_postmaster_reaped(self) -> None:
        """After kill(), wait until init reaps the old postmaster: a new one takes a zombie's PID as alive."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and not _process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _wait_accepting(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            check = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", LOOPBACK, "-p", str(self._port),
                 "-d", "postgres", "-t", "2"],
                env=self._env(), capture_output=True, timeout=10, check=False,
            )
            if check.returncode == 0:
                return
            if not self.is_running():
                raise RuntimeError(
                    f"PostgreSQL on port {self._port} exited during start-up; server log tail:\n"
                    f"{log_tail(self.log_file)}"
                )
            time.sleep(0.05)
        raise RuntimeError(
            f"PostgreSQL on port {self._port} did not accept connections within {self._start_timeout:.0f}s; "
            f"server log tail:\n{log_tail(self.log_file)}"
        )

    def _remove_tmp(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def interpreter_for(user: str, base_dir: str | os.PathLike[str]) -> str:
    """A Python that OS user ``user`` can run and that imports this environment's packages.

    Scratch clusters run their archive_command (`runbooks wal-push`) as ``user``; the project's virtualenv
    may sit where that user cannot reach (a pyenv build under /root, for one). Then a virtualenv of the
    system's Python of the same X.Y is made under ``base_dir``, as a regular install would be: the project's
    packages copied in and byte-compiled, our site-packages on its path as a plain entry (same X.Y, so
    compiled wheels fit). No editable finder, no recompiling on every start (PYTHONDONTWRITEBYTECODE may be
    set here). The copy is taken when the interpreter is made. Not root: this interpreter.
    """
    import sysconfig

    def usable(python: str) -> bool:
        probe = subprocess.run(
            ["runuser", "-u", user, "--", python, "-c", "import deployments.wal, zstandard, boto3"],
            cwd="/", capture_output=True, timeout=60, check=False,
        )
        return probe.returncode == 0

    if not _running_as_root() or usable(sys.executable):
        return sys.executable
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    system_python = shutil.which(f"python{version}", path="/usr/local/bin:/usr/bin:/bin")
    if system_python is None:
        raise RuntimeError(
            f"the {user} OS user cannot run {sys.executable} (a parent directory is private) and there is no "
            f"system python{version} to build a reachable one from: install the project in a virtualenv under "
            "a directory every user can enter (e.g. /opt/runbooks)"
        )
    venv = Path(base_dir) / f"python{version}-for-{user}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([system_python, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
        site_packages = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
        project = Path(__file__).resolve().parent.parent
        for package in ("deployments", "tasks", "blocks"):
            shutil.copytree(project / package, site_packages / package, ignore=shutil.ignore_patterns("__pycache__"))
        (site_packages / "runbooks-deps.pth").write_text(f"{sysconfig.get_path('purelib')}\n")
        subprocess.run([str(python), "-m", "compileall", "-q", str(site_packages)], check=True, capture_output=True)
    if not usable(str(python)):
        raise RuntimeError(f"{python} cannot import the project as {user}: is {base_dir} readable by {user}?")
    return str(python)


def _find_pg_bindir() -> Path:
    bindir = pg_bindir()  # $RUNBOOKS_PG_BINDIR, else `pg_config --bindir`: not on PATH on Debian
    if bindir is None:
        raise RuntimeError(
            "pg_config not found on PATH: install postgresql-15 and postgresql-client-15 "
            "(see `make system-deps`), set RUNBOOKS_PG_BINDIR or pass bindir="
        )
    return Path(bindir)
