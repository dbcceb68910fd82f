"""The WAL daemon: the long-lived helper behind `runbooks wal-push` and `wal-fetch` (deployments/wal.py).

One daemon serves one data directory and configuration over a Unix socket in its private spool. It keeps the
store client warm, uploads in a thread pool, queues the segments PostgreSQL has marked ``.ready`` beyond the
one it was asked for (look-ahead), and during recovery fetches the following segments into the spool
(prefetch). It exits when the postmaster is gone or after ``RUNBOOKS_WAL_IDLE_EXIT`` seconds without requests.
The commands start it as ``python -m deployments.wal wal-daemon``; it is never started by hand.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

from deployments.wal import (
    EXIT_ABORT,
    EXIT_FAILED,
    REPLY_WAIT,
    WalCommandError,
    WalConfig,
    check_cluster,
    fetch_file,
    file_signature,
    load_config,
    open_store,
    push_file,
    read_cluster_identity,
)

if TYPE_CHECKING:
    import socket


class _Job:
    def __init__(self, future: Any, signature: tuple[int, int, int] | None) -> None:
        self.future = future
        self.signature = signature
        self.finished_at: float | None = None


class WalDaemon:
    """Serves push and fetch requests for one data directory and one configuration."""

    def __init__(self, config: WalConfig, spool: str, pgdata: str) -> None:
        import logging
        import threading
        from concurrent.futures import ThreadPoolExecutor
        from logging.handlers import RotatingFileHandler

        self.config = config
        self.spool = spool
        self.pgdata = pgdata
        self.log = logging.getLogger("runbooks.wal")
        handler = RotatingFileHandler(os.path.join(spool, "daemon.log"), maxBytes=1 << 20, backupCount=2)
        handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(message)s"))
        self.log.addHandler(handler)
        self.log.setLevel(logging.INFO)
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="wal")
        self.pushes: dict[str, _Job] = {}
        self.fetches: dict[str, _Job] = {}
        self.failed_at: dict[str, float] = {}
        self.last_request = time.monotonic()
        self.busy = 0
        self.stopping = threading.Event()
        self.prefetch_dir = os.path.join(spool, "prefetch")
        self.segment_size: int | None = None
        self.store: Any = None
        self.identity_checked = False

    # -- lifecycle --------------------------------------------------------------------------
    def serve(self, server: socket.socket) -> None:
        import shutil
        import threading

        shutil.rmtree(self.prefetch_dir, ignore_errors=True)
        os.makedirs(self.prefetch_dir, mode=0o700)
        self.store = open_store(self.config)
        self.log.info("serving %s for %s (concurrency %d, look-ahead %d, prefetch %d)", self.store.description,
                      self.pgdata, self.config.concurrency, self.config.look_ahead, self.config.prefetch)
        threading.Thread(target=self._look_ahead_loop, daemon=True, name="look-ahead").start()
        server.settimeout(0.5)
        try:
            while not self.stopping.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    if self._should_exit():
                        break
                    continue
                with self.lock:
                    self.last_request = time.monotonic()
                    self.busy += 1
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        finally:
            self.stopping.set()
            self.pool.shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(self.prefetch_dir, ignore_errors=True)
            self.log.info("exiting")

    def _should_exit(self) -> bool:
        if not _postmaster_alive(self.pgdata):
            self.log.info("the postmaster of %s is gone", self.pgdata)
            return True
        with self.lock:
            idle = time.monotonic() - self.last_request
            return self.busy == 0 and idle > self.config.idle_exit

    # -- requests ---------------------------------------------------------------------------
    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(REPLY_WAIT)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                request = json.loads(data)
                try:
                    reply = self._dispatch(request)
                except WalCommandError as exc:
                    reply = {"ok": False, "error": str(exc), "code": exc.code}
                except Exception as exc:  # noqa: BLE001 - any failure is reported to the waiting command
                    # A failed fetch must abort recovery, never read as "not in the archive".
                    code = EXIT_ABORT if request.get("op") == "fetch" else EXIT_FAILED
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "code": code}
                conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass
        finally:
            with self.lock:
                self.busy -= 1
                self.last_request = time.monotonic()

    def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "push":
            return self._push(str(request["path"]))
        if op == "fetch":
            return self._fetch(str(request["name"]), str(request["path"]))
        raise WalCommandError(f"unknown request {op!r}")

    def _check_identity(self, create: bool) -> None:
        if not self.identity_checked:
            check_cluster(self.store, read_cluster_identity(self.pgdata), create=create)
            self.identity_checked = True

    def _push(self, path: str) -> dict[str, Any]:
        from tasks.wal import parse_wal_name

        started = time.monotonic()
        name = os.path.basename(path)
        parse_wal_name(name)
        self._check_identity(create=True)
        job = self._submit_push(path, wanted=True)
        self._wake_look_ahead()
        outcome = job.future.result()
        if job.future.exception() is None:
            self.log.info("%s: %s (%.0f ms)", name, outcome, 1000 * (time.monotonic() - started))
        return {"ok": True, "outcome": outcome}

    def _submit_push(self, path: str, *, wanted: bool) -> _Job:
        name = os.path.basename(path)
        signature = file_signature(path)
        with self.lock:
            job = self.pushes.get(name)
            if job is not None and job.signature == signature:
                failed = job.future.done() and job.future.exception() is not None
                if not failed:
                    return job
                if not wanted:
                    return job
            job = _Job(self.pool.submit(self._push_one, path), signature)
            self.pushes[name] = job
            return job

    def _push_one(self, path: str) -> str:
        name = os.path.basename(path)
        try:
            return push_file(self.store, path)
        except Exception as exc:
            self.log.error("%s: %s", name, exc)
            with self.lock:
                self.failed_at[name] = time.monotonic()
            raise
        finally:
            with self.lock:
                job = self.pushes.get(name)
                if job is not None:
                    job.finished_at = time.monotonic()

    # -- look-ahead -------------------------------------------------------------------------
    def _wake_look_ahead(self) -> None:
        with self.lock:
            self.last_request = time.monotonic()

    def _look_ahead_loop(self) -> None:
        from tasks.wal import archive_priority

        status_dir = os.path.join(self.pgdata, "pg_wal", "archive_status")
        while not self.stopping.is_set():
            with self.lock:
                active = time.monotonic() - self.last_request < 10 and self.identity_checked
            if not active or self.config.look_ahead == 0:
                self.stopping.wait(0.25)
                continue
            try:
                ready = sorted((n[: -len(".ready")] for n in os.listdir(status_dir) if n.endswith(".ready")),
                               key=archive_priority)
            except OSError:
                ready = []
            with self.lock:
                in_flight = sum(1 for j in self.pushes.values() if not j.future.done())
                room = self.config.concurrency + self.config.look_ahead - in_flight
                recent_failure = {n for n, t in self.failed_at.items() if time.monotonic() - t < 5}
            for name in ready:
                if room <= 0:
                    break
                if name in recent_failure:
                    continue
                with self.lock:
                    known = self.pushes.get(name)
                if known is not None:
                    continue
                try:
                    self._submit_push(os.path.join(self.pgdata, "pg_wal", name), wanted=False)
                    room -= 1
                except FileNotFoundError:
                    continue
            self._prune(set(ready))
            self.stopping.wait(0.01)

    def _prune(self, ready: set[str]) -> None:
        """Forget finished uploads PostgreSQL has marked done (their .ready is gone)."""
        now = time.monotonic()
        with self.lock:
            for name in [n for n, j in self.pushes.items()
                         if j.finished_at is not None and n not in ready and now - j.finished_at > 30]:
                del self.pushes[name]
            for name in [n for n, t in self.failed_at.items() if now - t > 60]:
                del self.failed_at[name]

    # -- fetch ------------------------------------------------------------------------------
    def _fetch(self, name: str, dest: str) -> dict[str, Any]:
        from tasks.wal import parse_wal_name

        wal = parse_wal_name(name)
        self._check_identity(create=False)
        with self.lock:
            job = self.fetches.pop(name, None)
        found: bool | None = None
        if job is not None:
            try:
                found = bool(job.future.result())
            except Exception:  # noqa: BLE001 - a failed prefetch is simply retried below
                found = None
            if found:
                staged = os.path.join(self.prefetch_dir, name)
                try:
                    _move(staged, dest)
                except FileNotFoundError:
                    found = None
        if not found:
            found = self._fetch_with_retry(name, dest)
        if wal.kind == "segment" and found:
            self._schedule_prefetch(name, dest)
        return {"ok": True, "found": found}

    def _fetch_with_retry(self, name: str, dest: str) -> bool:
        from blocks.errors import RunbookError

        deadline = time.monotonic() + self.config.fetch_retry_seconds
        delay = 0.5
        while True:
            try:
                return fetch_file(self.store, name, dest)
            except RunbookError as exc:
                if time.monotonic() + delay > deadline:
                    raise WalCommandError(f"{name}: {exc}", EXIT_ABORT) from None
                self.log.warning("%s: %s; retrying in %.1f s", name, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10)

    def _schedule_prefetch(self, name: str, fetched: str) -> None:
        from tasks.wal import parse_wal_name, segment_name

        if self.segment_size is None:
            try:
                self.segment_size = os.path.getsize(fetched)
            except OSError:
                return
        wal = parse_wal_name(name)
        segno = wal.segno(self.segment_size)
        with self.lock:
            for ahead in range(1, self.config.prefetch + 1):
                following = segment_name(wal.timeline, segno + ahead, self.segment_size)
                if following not in self.fetches:
                    staged = os.path.join(self.prefetch_dir, following)
                    self.fetches[following] = _Job(self.pool.submit(fetch_file, self.store, following, staged), None)
            # Drop prefetches recovery went past (another timeline, or skipped).
            for stale in [n for n in self.fetches if n < name and n[:8] == name[:8]]:
                self.fetches.pop(stale)


def _move(src: str, dest: str) -> None:
    try:
        os.replace(src, dest)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV: the spool is on another file system
            raise
        import shutil

        shutil.copyfile(src, dest + ".tmp")
        os.replace(dest + ".tmp", dest)
        os.unlink(src)


def _postmaster_alive(pgdata: str) -> bool:
    try:
        with open(os.path.join(pgdata, "postmaster.pid")) as handle:
            pid = int(handle.readline())
    except (OSError, ValueError):
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def run_daemon(argv: list[str]) -> int:
    """``wal-daemon --spool DIR --pgdata DIR [--config FILE]``: started by the commands, never by hand."""
    import argparse
    import fcntl
    import socket

    parser = argparse.ArgumentParser(prog="runbooks wal-daemon")
    parser.add_argument("--spool", required=True)
    parser.add_argument("--pgdata", required=True)
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    fingerprint = config.fingerprint(args.pgdata)
    os.umask(0o077)  # its own process: every file of the spool (prefetched WAL, logs, socket) private
    os.chmod(args.spool, 0o700)
    os.chdir(args.spool)
    lock = os.open(f"d-{fingerprint}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another daemon serves this configuration
    sock_name = f"d-{fingerprint}.sock"
    if os.path.exists(sock_name):
        os.unlink(sock_name)  # left by a daemon that died; we hold the lock, so nobody serves it
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        server.bind(sock_name)
    finally:
        os.umask(old_umask)
    server.listen(64)
    daemon = WalDaemon(config, os.path.abspath("."), os.path.abspath(args.pgdata))
    try:
        daemon.serve(server)
    finally:
        server.close()
        if os.path.exists(sock_name):
            os.unlink(sock_name)
    return 0
