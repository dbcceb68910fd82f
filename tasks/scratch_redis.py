"""A throwaway redis-server on loopback, for drills, restores (loaded beside the target), tests and the demo.

It lives in its own temp dir, listens on 127.0.0.1 only and is removed by ``stop()``; the password goes
through a config file inside that dir, never argv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tasks.process import Service, stop_process
from tasks.scratch import LOOPBACK, free_port, log_tail, port_was_taken, started_dir


def _redis_conf_quote(value: str) -> str:
    """Quote a value for redis.conf (sdssplitargs rules)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


class ScratchRedis(Service):
    """A throwaway redis-server on 127.0.0.1 that persists nothing unless asked (SAVE / BGSAVE).

    ``rdb_file`` is copied in as ``dump.rdb`` and loaded at start (a restore target).
    The password reaches the server through a 0600 config file in the temp dir.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        rdb_file: str | os.PathLike[str] | None = None,
        base_dir: str | None = None,
        binary: str | None = None,
        start_timeout: float = 30.0,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        tls_ca_file: str | None = None,
        tls_client: tuple[str, str] | None = None,
    ) -> None:
        """``password=None`` runs without AUTH; ``port=None`` picks a free port at start.

        ``tls_cert_file``/``tls_key_file``/``tls_ca_file``: the port speaks TLS only (``tls-port``, no plain
        port); ``tls_client`` (certificate, key): clients must present a certificate signed by the CA
        (``tls-auth-clients yes``), and this object's own client uses that one."""
        if tls_cert_file and not (tls_key_file and tls_ca_file):
            raise ValueError("tls_cert_file needs tls_key_file and tls_ca_file")
        self._tls = (tls_cert_file, tls_key_file, tls_ca_file) if tls_cert_file else None
        self._tls_client = tls_client
        self._port_given = port is not None
        self._port = port if port is not None else 0
        self._password = password
        self._rdb_file = Path(rdb_file) if rdb_file is not None else None
        self._base_dir = base_dir
        self._binary = binary
        self._start_timeout = start_timeout
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"ScratchRedis(port={self._port}, dir={self._tmp})"

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        return self._port

    @property
    def password(self) -> str | None:
        return self._password

    @property
    def dir(self) -> Path:
        """The server's working dir (``CONFIG GET dir``): where SAVE writes ``dump.rdb``."""
        return started_dir(self._tmp, self)

    @property
    def rdb_path(self) -> Path:
        return self.dir / "dump.rdb"

    @property
    def log_file(self) -> Path:
        return self.dir / "redis.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def url(self) -> str:
        """redis:// URL, with the password if any: for tests and the demo only, never log it."""
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        return f"redis://{auth}{LOOPBACK}:{self._port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """A redis-py client authenticated to this server."""
        if self._tls is not None:
            # The chain is checked; the host name is not (a test may give the server a certificate for
            # another name on purpose).
            kwargs = {"ssl": True, "ssl_ca_certs": self._tls[2], "ssl_check_hostname": False, **kwargs}
            if self._tls_client is not None:
                kwargs = {"ssl_certfile": self._tls_client[0], "ssl_keyfile": self._tls_client[1], **kwargs}
        return redis.Redis(host=LOOPBACK, port=self._port, password=self._password, **kwargs)  # type: ignore[arg-type]

    def start(self) -> Self:
        """Start redis-server and return once it answers PING."""
        binary = self._binary or shutil.which("redis-server")
        if binary is None or not Path(binary).is_file():
            raise RuntimeError("redis-server not found on PATH: install redis-server (see `make system-deps`)")
        if self._proc is not None and self._proc.poll() is None:
            return self
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="scratch-redis-", dir=self._base_dir))
            if self._rdb_file is not None:
                shutil.copyfile(self._rdb_file, self.rdb_path)
        attempts = 1 if self._port_given else 3
        try:
            for attempt in range(attempts):
                if not self._port_given and (attempt > 0 or self._port == 0):
                    self._port = free_port()
                try:
                    self._launch(binary)
                    return self
                except RuntimeError:
                    if attempt + 1 < attempts and port_was_taken(log_tail(self.log_file)):
                        continue
                    raise
        except BaseException:
            self.stop()
            raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """SIGTERM (no save: persistence is off), SIGKILL after 10 s, then remove the temp dir."""
        try:
            if self._proc is not None:
                stop_process(self._proc, timeout=10)
        finally:
            self._proc = None
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

    def kill(self) -> None:
        """SIGKILL the server (fault tests). The temp dir stays until ``stop()``."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def _write_config(self) -> Path:
        if self._tls is None:
            ports = [f"port {self._port}"]
        else:
            cert, key, ca = self._tls
            ports = ["port 0", f"tls-port {self._port}", f"tls-cert-file {_redis_conf_quote(cert)}",
                     f"tls-key-file {_redis_conf_quote(key)}", f"tls-ca-cert-file {_redis_conf_quote(ca)}",
                     f"tls-auth-clients {'yes' if self._tls_client else 'no'}"]
        lines = [
            *ports,
            f"bind {LOOPBACK}",
            "daemonize no",
            f"dir {_redis_conf_quote(str(self.dir))}",
            "dbfilename dump.rdb",
            f"logfile {_redis_conf_quote(str(self.log_file))}",
            'save ""',
            "appendonly no",
            # Scratch servers are sources of test/demo backups too: start a replication snapshot at once
            # instead of Redis's default 5 s wait for more replicas.
            "repl-diskless-sync-delay 0",
        ]
        if self._password is not None:
            lines.append(f"requirepass {_redis_conf_quote(self._password)}")
        path = self.dir / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        return path

    def _launch(self, binary: str) -> None:
        config = self._write_config()
        self.log_file.unlink(missing_ok=True)
        self._proc = subprocess.Popen(
            [binary, str(config)], cwd=self.dir, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self._start_timeout
        # No client-side retries: redis-py would back off for seconds on each refused connection.
        with self.client(socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)) as probe:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server on port {self._port} exited with {self._proc.returncode}; log tail:\n"
                        f"{log_tail(self.log_file)}"
                    )
                try:
                    if probe.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(
            f"redis-server on port {self._port} did not answer PING within {self._start_timeout:.0f}s; "
            f"log tail:\n{log_tail(self.log_file)}"
        )
