"""An RDB snapshot over Redis's replication protocol, as ``redis-cli --rdb`` takes it (redis-py cannot).

``SYNC`` (or ``REPLCONF rdb-only 1`` + ``PSYNC ? -1`` on Redis 7) makes the server send its RDB, either as
``$<length>\r\n<payload>`` or, for a diskless sync, ``$EOF:<40-byte mark>\r\n<payload><mark>``. The bytes go
to a sink as they arrive, checked to start with the RDB magic.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, Protocol

import redis

from blocks.errors import ConnectionFailed, DumpFailed
from blocks.redis import RedisConnection
from tasks.log import run_logger
from tasks.stream import CHUNK

RDB_MAGIC = b"REDIS"
_EOF_MARK_SIZE = 40  # the diskless-sync delimiter: 40 random hex characters


class ByteSink(Protocol):
    """Where snapshot bytes go: a CompressedWriter, a file, or both through a tee."""

    def write(self, data: bytes | memoryview, /) -> Any: ...


class _ReplicationLink:
    """A raw connection that talks just enough RESP to authenticate and ask for a full sync.

    redis-py cannot read the bulk RDB that follows SYNC, so this owns the socket. Every socket operation
    waits at most ``timeout`` seconds: the timeout is for a stalled server, not for the whole transfer
    (the newline keep-alives a master sends while it forks count as life).
    """

    def __init__(self, conn: RedisConnection, timeout: float) -> None:
        self.where = conn.describe()
        self.timeout = timeout
        self.doing = "connecting"
        self.pending = bytearray()  # bytes received past the last line handed out
        # The Block's client factory is the one place that unwraps the password and decides the TLS
        # options; read them from the (not yet connected) client it builds.
        self.options = conn.get_client().get_connection_kwargs()
        self.sock = self._connect(conn)

    def _connect(self, conn: RedisConnection) -> socket.socket:
        try:
            sock = socket.create_connection((conn.host, conn.port), timeout=self.timeout)
        except TimeoutError:
            raise self._stalled() from None
        except OSError as exc:
            raise ConnectionFailed(f"cannot connect to Redis {self.where}: {exc.strerror or exc}") from None
        sock.settimeout(self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not conn.tls:
            return sock
        context = ssl.create_default_context(cafile=self.options.get("ssl_ca_certs"))
        context.check_hostname = bool(self.options.get("ssl_check_hostname", True))
        if self.options.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.options.get("ssl_certfile"):
            context.load_cert_chain(self.options["ssl_certfile"], self.options.get("ssl_keyfile"))
        self.doing = "negotiating TLS"
        try:
            return context.wrap_socket(sock, server_hostname=conn.host)
        except TimeoutError:
            sock.close()
            raise self._stalled() from None
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise ConnectionFailed(f"TLS handshake with Redis {self.where} failed: {exc}") from None

    def close(self) -> None:
        self.sock.close()

    def _stalled(self) -> DumpFailed:
        return DumpFailed(
            f"Redis {self.where} sent nothing for {self.timeout:g} s while {self.doing}: the server is "
            "stalled, overloaded or not a Redis server; nothing was stored"
        )

    def recv(self, size: int) -> bytes:
        try:
            data = self.sock.recv(size)
        except TimeoutError:
            raise self._stalled() from None
        except OSError as exc:
            raise ConnectionFailed(f"connection to Redis {self.where} failed while {self.doing}: {exc}") from None
        if not data:
            raise ConnectionFailed(f"Redis {self.where} closed the connection while {self.doing}")
        return data

    def send(self, *args: bytes | str) -> None:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            raw = arg.encode() if isinstance(arg, str) else arg
            parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
        try:
            self.sock.sendall(b"".join(parts))
        except TimeoutError:
            raise self._stalled() from None
        except OSError as exc:
            raise ConnectionFailed(f"connection to Redis {self.where} failed while {self.doing}: {exc}") from None

    def read_line(self) -> bytes:
        """One reply line without its line end; an empty line is a keep-alive."""
        while True:
            end = self.pending.find(b"\n")
            if end >= 0:
                line = bytes(self.pending[:end]).rstrip(b"\r")
                del self.pending[: end + 1]
                return line
            if len(self.pending) > 64 * 1024:
                raise DumpFailed(f"Redis {self.where} sent a reply line over 64 KiB while {self.doing}")
            self.pending += self.recv(64 * 1024)

    def command(self, *args: str) -> bytes:
        """Send a command and return its one-line reply (``+OK`` or ``-ERR ...``)."""
        self.send(*args)
        return self.read_line()

    def take_pending(self) -> bytes:
        data = bytes(self.pending)
        self.pending.clear()
        return data


class RdbMagicCheck:
    """Passes bytes on to the sink and checks that they start with the RDB magic."""

    def __init__(self, sink: ByteSink, where: str) -> None:
        self.sink = sink
        self.where = where
        self.head = b""
        self.total = 0

    def write(self, data: bytes | memoryview) -> None:
        if not data:
            return
        if len(self.head) < len(RDB_MAGIC):
            self.head += bytes(data[: len(RDB_MAGIC) - len(self.head)])
            if not RDB_MAGIC.startswith(self.head[: len(RDB_MAGIC)]):
                raise DumpFailed(f"{self.where} did not send an RDB file (it starts with {self.head!r})")
        self.sink.write(data)
        self.total += len(data)

    def finish(self) -> int:
        if self.head != RDB_MAGIC:
            raise DumpFailed(f"{self.where} sent {self.total} bytes, too short for an RDB file")
        return self.total


def _reply_error(where: str, doing: str, reply: bytes) -> Exception:
    text = reply[1:].decode(errors="replace").rstrip(".")
    if text.startswith("NOPERM"):
        return ConnectionFailed(
            f"Redis {where} refused {doing}: {text}; the user needs the AUTH, REPLCONF and SYNC commands"
        )
    if text.startswith(("NOAUTH", "WRONGPASS")) or "invalid password" in text:
        return ConnectionFailed(
            f"Redis {where} refused {doing}: {text}; check the username and password of the RedisConnection block"
        )
    return DumpFailed(f"Redis {where} refused {doing}: {text}")


def _lower_diskless_delay(link: _ReplicationLink) -> str | None:
    """A server that syncs diskless waits ``repl-diskless-sync-delay`` seconds (Redis 7: 5) for more replicas
    before it streams. For a one-off snapshot that wait is pure delay (and, during a recovery's safety copy,
    downtime): set it to 0 and return the value to put back, or None when nothing was changed (a user
    without CONFIG then waits the server's delay)."""
    link.doing = "reading repl-diskless-sync settings"
    link.send("CONFIG", "GET", "repl-diskless-sync*")
    header = link.read_line()
    if not header.startswith(b"*"):
        run_logger().info("Redis %s: CONFIG GET refused (%s); the snapshot starts after the server's own "
                          "repl-diskless-sync-delay (5 s by default)", link.where,
                          header[1:120].decode(errors="replace"))
        return None
    values: list[bytes] = []
    for _ in range(int(header[1:])):
        link.read_line()  # $<length>: the values are short words and numbers
        values.append(link.read_line())
    settings = dict(zip(values[::2], values[1::2], strict=False))
    delay = settings.get(b"repl-diskless-sync-delay", b"0")
    if settings.get(b"repl-diskless-sync") != b"yes" or delay == b"0":
        return None
    reply = link.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")
    if reply.startswith(b"-"):
        run_logger().info("Redis %s: CONFIG SET refused (%s); the snapshot starts after the server's "
                          "repl-diskless-sync-delay of %s s", link.where, reply[1:120].decode(errors="replace"),
                          delay.decode())
        return None
    return delay.decode()


def _put_back_diskless_delay(conn: RedisConnection, value: str, timeout: float) -> None:
    try:
        conn.get_client(socket_timeout=timeout, socket_connect_timeout=timeout).config_set(
            "repl-diskless-sync-delay", value)
    except redis.RedisError as exc:
        run_logger().warning("Redis %s: could not set repl-diskless-sync-delay back to %s: %s; set it by hand",
                             conn.describe(), value, exc)


def stream_rdb(conn: RedisConnection, sink: ByteSink, *, timeout: float, diskless: bool = True) -> int:
    """Write a consistent RDB snapshot of the whole server to ``sink`` in chunks; returns bytes written.

    Works like ``redis-cli --rdb``: the server forks and sends the RDB as if to a new replica. With
    ``diskless`` the server is offered the socket form (``REPLCONF capa eof``), so a server configured
    with ``repl-diskless-sync yes`` (Redis 7's default) writes nothing to its own disk; its
    ``repl-diskless-sync-delay`` is set to 0 until the transfer starts (``_lower_diskless_delay``). Otherwise
    it writes its RDB file first. ``timeout`` bounds each silence from the server, not the whole transfer.
    """
    where = conn.describe()
    link = _ReplicationLink(conn, timeout)
    delay: str | None = None  # repl-diskless-sync-delay to put back
    try:
        options = link.options
        if options.get("password"):
            link.doing = "authenticating"
            args = ["AUTH", options["password"]]
            if options.get("username"):
                args.insert(1, options["username"])
            reply = link.command(*args)
            if reply.startswith(b"-"):
                raise _reply_error(where, "the credentials", reply)
        if diskless:
            delay = _lower_diskless_delay(link)
        link.doing = "asking for an RDB-only sync"
        # Redis >= 7.0: the master sends the RDB and then closes, rather than keeping us as a replica.
        reply = link.command("REPLCONF", "rdb-only", "1")
        if reply.startswith(b"-") and b"rdb-only" not in reply:
            raise _reply_error(where, "REPLCONF rdb-only", reply)
        if diskless:
            reply = link.command("REPLCONF", "capa", "eof")
            if reply.startswith(b"-"):
                raise _reply_error(where, "REPLCONF capa eof", reply)
        link.doing = "waiting for the snapshot to start"
        link.send("SYNC")
        while True:
            header = link.read_line()
            if not header or header.startswith(b"+FULLRESYNC"):
                continue  # keep-alive newline while the master forks; FULLRESYNC only after PSYNC
            if header.startswith(b"-"):
                raise _reply_error(where, "SYNC", header)
            if not header.startswith(b"$"):
                raise DumpFailed(f"Redis {where} answered SYNC with {header[:60]!r}, not a bulk RDB")
            break
        if delay is not None:  # the transfer has started: other replicas wait as configured again
            _put_back_diskless_delay(conn, delay, timeout)
            delay = None
        checked = RdbMagicCheck(sink, f"Redis {where}")
        link.doing = "receiving the snapshot"
        if header.startswith(b"$EOF:"):
            mark = header[5:]
            if len(mark) != _EOF_MARK_SIZE:
                raise DumpFailed(f"Redis {where} sent a malformed diskless header {header[:60]!r}")
            _copy_until_mark(link, checked, mark)
        else:
            try:
                length = int(header[1:])
            except ValueError:
                raise DumpFailed(f"Redis {where} sent a malformed bulk header {header[:60]!r}") from None
            _copy_exactly(link, checked, length)
        return checked.finish()
    finally:
        link.close()
        if delay is not None:
            _put_back_diskless_delay(conn, delay, timeout)


def _copy_exactly(link: _ReplicationLink, sink: RdbMagicCheck, length: int) -> None:
    first = link.take_pending()[:length]
    sink.write(first)
    remaining = length - len(first)
    while remaining:
        data = link.recv(min(CHUNK, remaining))
        sink.write(data)
        remaining -= len(data)


def _copy_until_mark(link: _ReplicationLink, sink: RdbMagicCheck, mark: bytes) -> None:
    """Diskless form: the payload ends where the last 40 bytes received equal the mark."""
    held = bytearray()  # the last bytes seen, which may be (part of) the mark
    data = link.take_pending()
    while True:
        held += data
        if len(held) >= _EOF_MARK_SIZE and held.endswith(mark):
            sink.write(held[:-_EOF_MARK_SIZE])
            return
        if len(held) > _EOF_MARK_SIZE:
            sink.write(held[:-_EOF_MARK_SIZE])
            del held[:-_EOF_MARK_SIZE]
        data = link.recv(CHUNK)
