"""Fault injection for tests: a TCP proxy on loopback that can drop every connection on demand.

Put it between a client and a real service (S3, PostgreSQL, Redis) and point the client at
``127.0.0.1:proxy.port``. ``go_down()`` resets every live connection and every new one until
``come_up()``; ``trip_after_bytes()`` does that mid-transfer, after a given upload (or download) volume.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from typing import Literal, Self

from tasks.process import Service
from tasks.scratch import LOOPBACK

_CHUNK = 64 * 1024
_POLL = 0.1  # how often blocked pumps look at the stop/down flags (seconds)
# SO_LINGER on, timeout 0: close() sends RST instead of FIN, as a crashed peer or a cut link would.
_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    """One proxied connection: client socket, upstream socket, and a pump thread per direction."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.abort = threading.Event()
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._open_directions = 2
        self._closed = False

    def direction_done(self) -> None:
        # Only the last pump closes: the other one may still be inside recv()/send() on these sockets.
        with self._lock:
            self._open_directions -= 1
            last = self._open_directions == 0
        if last:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.abort.is_set():
            _reset(self.client)
            _reset(self.upstream)
        else:
            for sock in (self.client, self.upstream):
                with contextlib.suppress(OSError):
                    sock.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def kill(self) -> None:
        """Make both pumps stop and close the sockets with RST."""
        self.abort.set()
        for sock in (self.client, self.upstream):
            # Wakes a pump blocked in recv() at once; sends nothing by itself.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)


class FaultyProxy(Service):
    """A threaded TCP proxy on a free 127.0.0.1 port in front of ``target_host:target_port``.

    Bounded: it stops by itself after ``max_lifetime`` seconds, and all its threads are daemons.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_port: int = 0,
        max_lifetime: float = 600.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target = (target_host, target_port)
        self._listen_port = listen_port
        self._max_lifetime = max_lifetime
        self._connect_timeout = connect_timeout
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._down = threading.Event()
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._up_timer: threading.Timer | None = None
        self._lifetime_timer: threading.Timer | None = None
        self._trip_remaining: int | None = None
        self._trip_down_for: float | None = None
        self._trip_upstream = True  # which direction's bytes the armed trip counts
        self.bytes_up = 0  # client -> server, all connections, since start()
        self.bytes_down = 0  # server -> client
        self.connections = 0  # accepted while up
        self.resets = 0  # connections cut by go_down() or refused while down
        self.down_delay = 0.0  # seconds each server -> client chunk (up to 64 KiB) waits: a slow link

    # -- public API ---------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("FaultyProxy is not started")
        return int(self._listener.getsockname()[1])

    @property
    def url_port(self) -> int:
        """The port clients connect to instead of the target's."""
        return self.port

    @property
    def running(self) -> bool:
        return self._listener is not None

    @property
    def is_down(self) -> bool:
        return self._down.is_set()

    def start(self) -> Self:
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self._listen_port))
        listener.listen(128)
        listener.settimeout(_POLL)
        self._listener = listener
        self._stopping.clear()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="faulty-proxy-accept", daemon=True)
        self._accept_thread.start()
        self._lifetime_timer = threading.Timer(self._max_lifetime, self.stop)
        self._lifetime_timer.daemon = True
        self._lifetime_timer.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection; waits for the threads (a few hundred ms at most)."""
        self._stopping.set()
        for timer in (self._up_timer, self._lifetime_timer):
            if timer is not None and timer is not threading.current_thread():
                timer.cancel()
        self._drop_all()
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(timeout=5)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None

    def go_down(self, seconds: float | None = None) -> None:
        """Reset every live connection and every new one until ``come_up()`` (or for ``seconds``)."""
        with self._lock:
            self._down.set()
            if self._up_timer is not None:
                self._up_timer.cancel()
                self._up_timer = None
            if seconds is not None:
                self._up_timer = threading.Timer(seconds, self.come_up)
                self._up_timer.daemon = True
                self._up_timer.start()
        self._drop_all()

    def come_up(self) -> None:
        """Pass traffic again (new connections; the cut ones stay cut)."""
        with self._lock:
            if self._up_timer is not None and self._up_timer is not threading.current_thread():
                self._up_timer.cancel()
            self._up_timer = None
            self._down.clear()

    def trip_after_bytes(self, n: int, down_for_seconds: float | None,
                         direction: Literal["up", "down"] = "up") -> None:
        """Pass ``n`` more bytes client -> server (``direction="down"``: server -> client), all connections
        together, then go down for a while (``None``: until ``come_up()``)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._trip_remaining = n
            self._trip_down_for = down_for_seconds
            self._trip_upstream = direction == "up"

    # -- internals ----------------------------------------------------------------------------
    def _drop_all(self) -> None:
        with self._lock:
            links = list(self._links)
            self.resets += len(links)
        for link in links:
            link.kill()
        current = threading.current_thread()
        for link in links:
            for thread in link.threads:
                if thread is not current:
                    thread.join(timeout=2)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._down.is_set() or self._stopping.is_set():
                with self._lock:
                    self.resets += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=self._connect_timeout)
            except OSError:
                _reset(client)  # the target itself is down: look the same to the client
                continue
            for sock in (client, upstream):
                sock.settimeout(_POLL)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream)
            link.threads = [
                threading.Thread(target=self._pump, args=(link, client, upstream, True), daemon=True,
                                 name="faulty-proxy-up"),
                threading.Thread(target=self._pump, args=(link, upstream, client, False), daemon=True,
                                 name="faulty-proxy-down"),
            ]
            with self._lock:
                # go_down() may have run while we were connecting upstream.
                refused = self._down.is_set() or self._stopping.is_set()
                if refused:
                    self.resets += 1
                else:
                    self._links.add(link)
                    self.connections += 1
            if refused:
                _reset(client)
                _reset(upstream)
                continue
            for thread in link.threads:
                thread.start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        trip = False
        try:
            while not link.abort.is_set():
                try:
                    data = src.recv(_CHUNK)
                except TimeoutError:
                    continue
                except OSError:
                    link.abort.set()
                    break
                if not data:
                    if link.abort.is_set():
                        break
                    # Half-close: pass the FIN on, keep the other direction running.
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    break
                if not upstream and self.down_delay:
                    time.sleep(self.down_delay)
                data, trip = self._account(data, upstream)
                if data and not self._send_all(link, dst, data):
                    link.abort.set()
                    break
                if trip:
                    break
        finally:
            if trip:
                self.go_down(self._trip_down_for)
            link.direction_done()
            if link.closed:
                with self._lock:
                    self._links.discard(link)

    def _account(self, data: bytes, upstream: bool) -> tuple[bytes, bool]:
        """Count the bytes of one direction; cut ``data`` where a trip armed for that direction fires."""
        with self._lock:
            trip = False
            if self._trip_remaining is not None and self._trip_upstream == upstream:
                if len(data) >= self._trip_remaining:
                    data = data[: self._trip_remaining]
                    self._trip_remaining = None
                    trip = True
                else:
                    self._trip_remaining -= len(data)
            if upstream:
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)
            return data, trip

    def _send_all(self, link: _Link, dst: socket.socket, data: bytes) -> bool:
        view = memoryview(data)
        deadline = time.monotonic() + 60
        while view:
            if link.abort.is_set() or time.monotonic() > deadline:
                return False
            try:
                sent = dst.send(view)
            except TimeoutError:
                continue
            except OSError:
                return False
            view = view[sent:]
        return True
