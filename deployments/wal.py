"""`runbooks wal-push %p` and `runbooks wal-fetch %f %p`: PostgreSQL's archive_command and restore_command.

PostgreSQL runs these once per WAL file, as the postgres OS user, in the data directory. They never import
Prefect (or pydantic): the command PostgreSQL waits for only talks, over a Unix socket in a private spool
directory, to a long-lived helper process (the *WAL daemon*) that it starts on first use. The daemon keeps
the store client and its connections warm, compresses and uploads in parallel, and looks ahead at
``pg_wal/archive_status/*.ready`` so the next segments are often stored before PostgreSQL asks for them.
PostgreSQL is told success only once its file is durable in the store (an S3 PUT answered, or a local file
fsynced and linked into place); the daemon's record of a finished upload lives in its memory only, tied to
the file's inode, size and mtime, and is never trusted for a file that changed. During recovery the same
daemon prefetches the next segments, decompressed and checked, so restore_command returns at once.

If the daemon cannot be reached, the command does the work itself (slower start: boto3), so archiving
never depends on it. Set ``RUNBOOKS_WAL_ASYNC=off`` to always work in the foreground.

Configuration (environment, or a ``KEY=VALUE`` file named by ``--config``, whose values win; never argv:
archive_command is visible to every database user in pg_settings):

``RUNBOOKS_WAL_STORE``        ``s3://bucket/prefix?endpoint_url=...&region=...`` or ``file:///dir`` (required)
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``   S3 credentials (else boto3's chain)
``RUNBOOKS_WAL_CONCURRENCY``  uploads/downloads at once (default 4)
``RUNBOOKS_WAL_LOOKAHEAD``    ``.ready`` files queued beyond those in flight (default 8)
``RUNBOOKS_WAL_PREFETCH``     segments fetched ahead during recovery (default 8)
``RUNBOOKS_WAL_ASYNC``        ``on`` (default) or ``off``
``RUNBOOKS_WAL_IDLE_EXIT``    seconds without requests before the daemon exits (default 120)
``RUNBOOKS_WAL_SPOOL``        the daemon's private directory (default ``pg_wal/runbooks``)
``RUNBOOKS_WAL_FETCH_RETRY_SECONDS``  how long wal-fetch retries a failing store before aborting recovery (60)

Exit codes: 0 done. wal-push: 1 on any failure (PostgreSQL keeps the segment and retries). wal-fetch: 1 when
the file is not in the archive (PostgreSQL then ends recovery or tries another timeline); 255 when the store
fails or a file is corrupt, which makes PostgreSQL abort recovery instead of promoting with WAL missing.
"""

from __future__ import annotations

import json
import os
import sys
import time

# Not even `typing` at run time: every import here is paid on every archived segment.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1  # wal-push: PostgreSQL retries; wal-fetch: "not in the archive"
EXIT_ABORT = 255  # wal-fetch: > 125 makes PostgreSQL abort recovery rather than treat it as end of archive
USAGE = """usage: runbooks wal-push [--config FILE] %p
       runbooks wal-fetch [--config FILE] %f %p"""

_ENV_KEYS = (
    "RUNBOOKS_WAL_STORE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "RUNBOOKS_WAL_CONCURRENCY", "RUNBOOKS_WAL_LOOKAHEAD", "RUNBOOKS_WAL_PREFETCH", "RUNBOOKS_WAL_ASYNC",
    "RUNBOOKS_WAL_IDLE_EXIT", "RUNBOOKS_WAL_SPOOL", "RUNBOOKS_WAL_FETCH_RETRY_SECONDS",
)
_SECRET_KEYS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SPAWN_WAIT = 15.0  # seconds the command waits for a daemon it started to answer
REPLY_WAIT = 900.0  # seconds it waits for the daemon to finish one file


class WalCommandError(Exception):
    """A failure to report on stderr (PostgreSQL copies it into its log); ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------- configuration


class WalConfig:
    """Settings of the WAL commands (a plain class, not a dataclass: this module is on the fast path)."""

    __slots__ = ("store_url", "access_key_id", "secret_access_key", "session_token", "concurrency", "look_ahead",
                 "prefetch", "async_mode", "idle_exit", "spool", "fetch_retry_seconds", "config_file")

    def __init__(
        self, store_url: str, *, access_key_id: str | None = None, secret_access_key: str | None = None,
        session_token: str | None = None, concurrency: int = 4, look_ahead: int = 8, prefetch: int = 8,
        async_mode: bool = True, idle_exit: float = 120.0, spool: str | None = None,
        fetch_retry_seconds: float = 60.0, config_file: str | None = None,
    ) -> None:
        self.store_url = store_url
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.session_token = session_token
        self.concurrency = concurrency
        self.look_ahead = look_ahead
        self.prefetch = prefetch
        self.async_mode = async_mode
        self.idle_exit = idle_exit
        self.spool = spool
        self.fetch_retry_seconds = fetch_retry_seconds
        self.config_file = config_file

    def replace(self, **changes: Any) -> WalConfig:
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return WalConfig(**values)

    def __repr__(self) -> str:  # no credentials in reprs
        return f"WalConfig(store_url={self.store_url!r}, concurrency={self.concurrency}, async={self.async_mode})"

    def fingerprint(self, pgdata: str) -> str:
        """Names the daemon serving this configuration and data directory (a changed config: a new daemon).

        A CRC is enough: the name only tells configurations apart, inside a directory only postgres reads.
        """
        import zlib

        values = [os.path.realpath(pgdata), self.store_url, self.access_key_id, self.secret_access_key,
                  self.session_token, self.concurrency, self.look_ahead, self.prefetch, self.fetch_retry_seconds]
        return f"{zlib.crc32(json.dumps(values).encode()):08x}"


def read_env_file(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, optional ``export`` and quotes); refuses a world-readable file."""
    try:
        stat = os.stat(path)
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise WalCommandError(f"cannot read config file {path}: {exc.strerror}") from None
    if stat.st_mode & 0o007:
        raise WalCommandError(f"config file {path} is readable by every user; it may hold credentials: chmod 600 it")
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise WalCommandError(f"config file {path} line {number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def load_config(config_file: str | None, environ: dict[str, str] | None = None) -> WalConfig:
    """Settings from the environment, overridden by the ``--config`` file."""
    source = {k: v for k, v in (os.environ if environ is None else environ).items() if k in _ENV_KEYS}
    if config_file:
        source.update(read_env_file(config_file))
    url = source.get("RUNBOOKS_WAL_STORE", "").strip()
    if not url:
        where = f" or in {config_file}" if config_file else " (or pass --config FILE)"
        raise WalCommandError(f"RUNBOOKS_WAL_STORE is not set in the environment{where}")

    def number(key: str, default: float, low: float, high: float) -> float:
        text = source.get(key, "").strip()
        if not text:
            return default
        try:
            value = float(text)
        except ValueError:
            raise WalCommandError(f"{key}={text!r} is not a number") from None
        if not low <= value <= high:
            raise WalCommandError(f"{key}={text} is outside {low:g}..{high:g}")
        return value

    async_text = source.get("RUNBOOKS_WAL_ASYNC", "on").strip().lower()
    if async_text not in ("on", "off", "1", "0", "true", "false", "yes", "no"):
        raise WalCommandError(f"RUNBOOKS_WAL_ASYNC={async_text!r}: use on or off")
    return WalConfig(
        store_url=url,
        access_key_id=source.get("AWS_ACCESS_KEY_ID") or None,
        secret_access_key=source.get("AWS_SECRET_ACCESS_KEY") or None,
        session_token=source.get("AWS_SESSION_TOKEN") or None,
        concurrency=int(number("RUNBOOKS_WAL_CONCURRENCY", 4, 1, 64)),
        look_ahead=int(number("RUNBOOKS_WAL_LOOKAHEAD", 8, 0, 256)),
        prefetch=int(number("RUNBOOKS_WAL_PREFETCH", 8, 0, 256)),
        async_mode=async_text in ("on", "1", "true", "yes"),
        idle_exit=number("RUNBOOKS_WAL_IDLE_EXIT", 120, 1, 86400),
        spool=source.get("RUNBOOKS_WAL_SPOOL") or None,
        fetch_retry_seconds=number("RUNBOOKS_WAL_FETCH_RETRY_SECONDS", 60, 0, 86400),
        config_file=os.path.abspath(config_file) if config_file else None,
    )


def open_store(config: WalConfig) -> Any:
    """The store client for ``RUNBOOKS_WAL_STORE`` (parsed like ``BackupStore.from_url``, WAL defaults)."""
    from blocks.backends import LocalStore, MiB, make_s3_store, parse_store_url
    from blocks.errors import RunbookError

    try:
        url = parse_store_url(config.store_url, credentials_hint="AWS_* variables")
    except RunbookError as exc:
        raise WalCommandError(f"RUNBOOKS_WAL_STORE: {exc}") from None
    if url.backend == "local":
        if not url.path.startswith("/"):
            raise WalCommandError(f"RUNBOOKS_WAL_STORE {config.store_url!r}: a local store needs an absolute path")
        from pathlib import Path

        return LocalStore(Path(url.path))
    query = url.options
    where = f" at {query['endpoint_url']}" if query.get("endpoint_url") else ""
    try:
        return make_s3_store(
            bucket=url.bucket, prefix=url.prefix,
            description=f"s3://{url.bucket}{'/' + url.prefix if url.prefix else ''}{where}",
            endpoint_url=query.get("endpoint_url"), region=query.get("region"),
            access_key_id=config.access_key_id, secret_access_key=config.secret_access_key,
            session_token=config.session_token, sse=query.get("sse", ""), kms_key_id=query.get("kms_key_id"),
            # One PUT per segment (16 MiB raw at most) rather than a multipart upload of four requests.
            storage_class=query.get("storage_class"), part_size=int(query.get("part_size_mib", 64)) * MiB,
            max_concurrency=max(int(query.get("max_concurrency", 4)), config.concurrency),
        )
    except (RunbookError, ValueError) as exc:
        raise WalCommandError(f"RUNBOOKS_WAL_STORE: {exc}") from None


# ------------------------------------------------------------------------------------ the actual work


def file_signature(path: str) -> tuple[int, int, int]:
    stat = os.stat(path)
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def read_cluster_identity(pgdata: str) -> dict[str, str]:
    """System identifier (first 8 bytes of global/pg_control) and major version of the cluster in ``pgdata``."""
    try:
        with open(os.path.join(pgdata, "global", "pg_control"), "rb") as handle:
            system_identifier = int.from_bytes(handle.read(8), sys.byteorder)
        with open(os.path.join(pgdata, "PG_VERSION")) as handle:
            version = handle.read().strip()
    except OSError as exc:
        raise WalCommandError(f"{pgdata} is not a PostgreSQL data directory ({exc.strerror}): "
                              "archive_command and restore_command run in the data directory") from None
    return {"system_identifier": str(system_identifier), "pg_version": version}


def check_cluster(store: Any, identity: dict[str, str], *, create: bool) -> None:
    """The archive belongs to one cluster: record its identity on first push, refuse WAL of another one."""
    from blocks.errors import ObjectExists, StoreError
    from tasks.wal import CLUSTER_KEY

    try:
        recorded = json.loads(store.get_bytes(CLUSTER_KEY))
    except StoreError:
        if store.exists(CLUSTER_KEY):
            raise
        if not create:
            return
        try:
            store.put_bytes(CLUSTER_KEY, json.dumps(identity).encode() + b"\n")
            return
        except ObjectExists:
            recorded = json.loads(store.get_bytes(CLUSTER_KEY))
    if recorded.get("system_identifier") != identity["system_identifier"]:
        raise WalCommandError(
            f"the WAL archive in {store.description} belongs to another cluster (system identifier "
            f"{recorded.get('system_identifier')}, PostgreSQL {recorded.get('pg_version')}); this one is "
            f"{identity['system_identifier']} (PostgreSQL {identity['pg_version']}). Nothing was written: "
            "give each cluster its own store prefix (a new one after pg_upgrade)", EXIT_ABORT)


def push_file(store: Any, path: str) -> str:
    """Compress ``path`` into the archive; an identical copy already there is success, a different one refused.

    Returns what happened: ``stored`` or ``identical copy already archived``.
    """
    import hashlib

    from blocks.errors import ObjectExists
    from tasks.stream import compress_into_store
    from tasks.wal import parse_wal_name, wal_key

    name = os.path.basename(path)
    wal = parse_wal_name(name)
    raw_sha = None
    if wal.kind == "partial":
        with open(path, "rb") as handle:
            raw_sha = hashlib.file_digest(handle, "sha256").hexdigest()
    key = wal_key(name, raw_sha)
    try:
        with open(path, "rb") as source:
            # One zstd thread per file: under a backlog the daemon pushes several files at once, and that is
            # where the parallelism comes from.
            compress_into_store(store, key, source, level=1, threads=0)
        return "stored"
    except ObjectExists:
        pass
    with open(path, "rb") as handle:
        local = hashlib.file_digest(handle, "sha256").hexdigest()
    archived = _archived_sha256(store, key)
    if archived == local:
        return "identical copy already archived"
    raise WalCommandError(
        f"{name}: the archive already holds a DIFFERENT {name} ({store.description}/{key}, content sha256 "
        f"{archived[:16]}..., this file {local[:16]}...); nothing was overwritten. Two clusters may be "
        "archiving into one prefix, or this cluster was restored without a new timeline: check "
        "RUNBOOKS_WAL_STORE before anything else archives here"
    )


def _decompress(raw: Any, write: Any, where: str) -> None:
    """Decompress a stored zstd frame into ``write``; a frame cut short or failing its checksum is corrupt.

    A stream reader would end quietly at a damaged block header and hand back a shorter file; the
    decompression object says whether the frame, and so its content checksum, was reached.
    """
    import zstandard

    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
        while chunk := raw.read(1 << 20):
            if decompressor.eof:
                raise zstandard.ZstdError("data after the end of the frame")
            write(decompressor.decompress(chunk))
    except zstandard.ZstdError as exc:
        raise WalCommandError(f"archived copy {where} is corrupt ({exc}); recovery must not go on without it",
                              EXIT_ABORT) from None
    if not decompressor.eof:
        raise WalCommandError(f"archived copy {where} is corrupt (the zstd frame ends early); recovery must not "
                              "go on without it", EXIT_ABORT)


def _archived_sha256(store: Any, key: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with store.open_read(key) as raw:
        _decompress(raw, digest.update, f"{store.description}/{key}")
    return digest.hexdigest()


def fetch_file(store: Any, name: str, dest: str) -> bool:
    """Download and decompress ``name`` into ``dest`` (via a temporary file); False when not archived.

    The zstd frame carries a checksum of the content, checked while decompressing.
    """
    from blocks.errors import StoreError
    from tasks.wal import wal_key

    key = wal_key(name)
    tmp = f"{dest}.runbooks-{os.getpid()}-{time.monotonic_ns()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # WAL is the data: 0600 whatever the umask
        os.fchmod(fd, 0o600)
        with open(fd, "wb") as out, store.open_read(key) as raw:
            _decompress(raw, out.write, f"{store.description}/{key}")
        os.replace(tmp, dest)
        return True
    except StoreError:
        if not store.exists(key):
            return False
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _run_sync(op: str, config: WalConfig, path: str, name: str | None, pgdata: str) -> int:
    """Do one push or fetch in this process (no daemon)."""
    from blocks.errors import ChecksumMismatch, ConfigurationError, RunbookError

    store = open_store(config)
    deadline = time.monotonic() + (config.fetch_retry_seconds if op == "fetch" else 0)
    delay = 0.5
    while True:
        try:
            if op == "push":
                check_cluster(store, read_cluster_identity(pgdata), create=True)
                push_file(store, path)
                return EXIT_OK
            assert name is not None
            check_cluster(store, read_cluster_identity(pgdata), create=False)
            if fetch_file(store, name, path):
                return EXIT_OK
            print(f"wal-fetch: {name} is not in the archive {store.description}", file=sys.stderr)
            return EXIT_FAILED
        except (ConfigurationError, ChecksumMismatch) as exc:
            raise WalCommandError(str(exc), EXIT_ABORT if op == "fetch" else EXIT_FAILED) from None
        except RunbookError as exc:  # the store failed: retry a fetch for a while, then abort recovery
            if time.monotonic() + delay > deadline:
                raise WalCommandError(str(exc), EXIT_ABORT if op == "fetch" else EXIT_FAILED) from None
            time.sleep(delay)
            delay = min(delay * 2, 10)


# ----------------------------------------------------------------------------- command side of the daemon


def spool_dir(config: WalConfig, wal_path: str) -> str:
    return config.spool or os.path.join(os.path.dirname(wal_path), "runbooks")


def _ask_daemon(config: WalConfig, spool: str, pgdata: str, request: dict[str, Any]) -> dict[str, Any] | None:
    """Send one request to the daemon (starting it if needed); None when it cannot be reached."""
    sock_name = f"d-{config.fingerprint(pgdata)}.sock"
    try:
        os.makedirs(spool, mode=0o700, exist_ok=True)
        os.chmod(spool, 0o700)
    except OSError:
        return None
    started = None
    deadline = time.monotonic() + _SPAWN_WAIT
    while True:
        try:
            return _exchange(spool, sock_name, request)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        except (OSError, ValueError):
            return None  # the daemon went away mid-request: do it ourselves
        if started is None:
            started = _spawn_daemon(config, spool, pgdata)
        elif started.poll() is not None and started.returncode != 0:
            return None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def _exchange(spool: str, sock_name: str, request: dict[str, Any]) -> dict[str, Any]:
    # The C module: `socket` costs milliseconds of imports (enum, selectors) on every archived segment.
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(REPLY_WAIT)
        # A path relative to the spool keeps us under the 108-byte limit of socket paths.
        cwd = os.open(".", os.O_RDONLY)
        try:
            os.chdir(spool)
            sock.connect(sock_name)
        finally:
            os.fchdir(cwd)
            os.close(cwd)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ValueError("daemon closed the connection without an answer")
            data += chunk
    finally:
        sock.close()
    return json.loads(data)


def _spawn_daemon(config: WalConfig, spool: str, pgdata: str) -> Any:
    import subprocess

    argv = [sys.executable, "-m", "deployments.wal", "wal-daemon", "--spool", spool, "--pgdata", pgdata]
    if config.config_file:
        argv += ["--config", config.config_file]
    log = os.open(os.path.join(spool, "daemon.out"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        # Its own session: PostgreSQL's archiver does not wait for it, and signals to its group miss it.
        return subprocess.Popen(  # noqa: S603 - argv list, no shell
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
            cwd=pgdata,
        )
    finally:
        os.close(log)


# ------------------------------------------------------------------------------------------- commands


def _split(argv: list[str]) -> tuple[str | None, list[str]]:
    config = None
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            config = next(args, None)
            if config is None:
                raise WalCommandError("--config needs a file name")
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg in ("-h", "--help"):
            raise WalCommandError(USAGE, EXIT_OK)
        elif arg.startswith("-"):
            raise WalCommandError(f"unknown option {arg}\n{USAGE}")
        else:
            rest.append(arg)
    return config, rest


def wal_push(argv: list[str]) -> int:
    config_file, rest = _split(argv)
    if len(rest) != 1:
        raise WalCommandError(f"wal-push takes one argument, the WAL file's path (%p)\n{USAGE}")
    config = load_config(config_file)
    pgdata = os.getcwd()
    path = os.path.abspath(rest[0])
    if not os.path.isfile(path):
        raise WalCommandError(f"{path}: no such WAL file")
    if config.async_mode:
        reply = _ask_daemon(config, spool_dir(config, path), pgdata, {"op": "push", "path": path})
        if reply is not None:
            if reply.get("ok"):
                return EXIT_OK
            raise WalCommandError(str(reply.get("error")), EXIT_FAILED)
    return _run_sync("push", config, path, None, pgdata)


def wal_fetch(argv: list[str]) -> int:
    config_file, rest = _split(argv)
    if len(rest) != 2:
        raise WalCommandError(f"wal-fetch takes two arguments, the file name (%f) and where to put it (%p)\n{USAGE}")
    config = load_config(config_file)
    name, dest = rest[0], os.path.abspath(rest[1])
    pgdata = os.getcwd()
    if "/" in name:
        raise WalCommandError(f"wal-fetch: {name!r} is a path; restore_command passes the file name (%f) first")
    if config.async_mode:
        reply = _ask_daemon(config, spool_dir(config, dest), pgdata, {"op": "fetch", "name": name, "path": dest})
        if reply is not None:
            if not reply.get("ok"):
                raise WalCommandError(str(reply.get("error")), int(reply.get("code", EXIT_ABORT)))
            if reply.get("found"):
                return EXIT_OK
            print(f"wal-fetch: {name} is not in the archive", file=sys.stderr)
            return EXIT_FAILED
    return _run_sync("fetch", config, dest, name, pgdata)


def main(argv: list[str]) -> int:
    """Entry point: ``argv[0]`` is the command (wal-push, wal-fetch, wal-daemon)."""
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    try:
        if command == "wal-push":
            return wal_push(rest)
        if command == "wal-fetch":
            return wal_fetch(rest)
        if command == "wal-daemon":
            from deployments.wal_daemon import run_daemon

            return run_daemon(rest)
        raise WalCommandError(USAGE)
    except WalCommandError as exc:
        stream = sys.stdout if exc.code == EXIT_OK else sys.stderr
        print(f"{command or 'runbooks'}: {exc}", file=stream)
        return exc.code
    except OSError as exc:  # a local file: unreadable WAL, full disk, spool permissions
        print(f"{command or 'runbooks'}: {exc}", file=sys.stderr)
        return EXIT_ABORT if command == "wal-fetch" else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_ABORT if command == "wal-fetch" else EXIT_FAILED


if __name__ == "__main__":
    # Through the importable module, which deployments.wal_daemon imports too: one WalCommandError class.
    from deployments.wal import main as _main

    sys.exit(_main(sys.argv[1:]))
