"""A base backup read straight off a replication connection (``BASE_BACKUP``, PostgreSQL 15+)."""

from __future__ import annotations

import tarfile
import time
from collections.abc import Iterator
from typing import Any

from blocks.errors import BaseBackupFailed
from tasks.manifest import BACKUP_MANIFEST
from tasks.pitr.tar import TAR_END


class ReplicationBaseBackup:
    """``BASE_BACKUP`` over a replication connection (PostgreSQL 15+), read with libpq: the tar that
    ``pg_basebackup -Ft -D - -X none`` writes (the server's archive, backup_manifest as its last member, the
    end blocks), without a pg_basebackup process and a pipe in between (pg_basebackup spends ~1.1 CPU
    seconds per GiB on that; reading the connection here takes ~0.2 of it back; docs/pitr.md).

    The server sends the archive (ending with the two zero blocks) and then backup_manifest separately; the
    last 1 KiB is held back so the manifest can go in before the end blocks, as pg_basebackup does. Its
    messages (32 KiB) are passed on as libpq returns them: gathering them into bigger chunks costs a copy
    of every byte and saves less than that.
    """

    def __init__(self, conn: Any, target: str, command: str) -> None:
        self.conn = conn
        self.target = target
        self.command = command

    def _wait(self) -> None:
        import select

        import psycopg

        select.select([self.conn.pgconn.socket], [], [])
        try:
            self.conn.pgconn.consume_input()
        except psycopg.OperationalError as exc:  # the connection broke: a retry starts over
            raise self._failed(str(exc)) from None

    def _result(self) -> Any:
        """The next result (None after the last); waits without holding the GIL, so uploads go on."""
        from psycopg import pq

        pgconn = self.conn.pgconn
        while pgconn.is_busy():
            self._wait()
        result = pgconn.get_result()
        if result is not None and result.status == pq.ExecStatus.FATAL_ERROR:
            raise self._failed(result.error_message)
        return result

    def _failed(self, message: bytes | str) -> BaseBackupFailed:
        text = message.decode(errors="replace") if isinstance(message, bytes) else message
        return BaseBackupFailed(f"base backup of {self.target} failed: {text.strip()}")

    def chunks(self) -> Iterator[bytes | memoryview]:
        from psycopg import pq

        pgconn = self.conn.pgconn
        pgconn.send_query(self.command.encode())
        while (result := self._result()) is not None and result.status != pq.ExecStatus.COPY_OUT:
            if result.nfields and result.fname(0) == b"spcoid" and result.ntuples > 1:
                raise BaseBackupFailed(f"{self.target} has {result.ntuples - 1} tablespace(s) outside the data "
                                       "directory: a streamed base backup holds the data directory only")
        if result is None:
            raise self._failed(pgconn.error_message or b"the server sent no backup")
        held: list[memoryview] = []  # the archive's last messages, at least 1 KiB once there are that many
        held_size = 0
        manifest = bytearray()
        in_manifest = False
        while True:
            count, data = pgconn.get_copy_data(1)
            if count == 0:
                self._wait()
                continue
            if count == -1:
                break
            if count < 0:
                raise self._failed(pgconn.error_message)
            kind = data[0]
            if kind == 0x64:  # 'd': archive or manifest bytes
                if in_manifest:
                    manifest += data[1:]
                    continue
                held.append(data[1:])
                held_size += count - 1
                while held_size - len(held[0]) >= len(TAR_END):
                    held_size -= len(held[0])
                    yield held.pop(0)
            elif kind == 0x6E and held_size:  # 'n': a second archive, i.e. a tablespace
                raise BaseBackupFailed(f"{self.target} sent more than one archive: tablespaces are not supported")
            elif kind == 0x6D:  # 'm': backup_manifest follows
                in_manifest = True
        while self._result() is not None:  # the stop position, then the command's completion
            pass
        tail = b"".join(held)
        if not tail.endswith(TAR_END) or not manifest:
            raise BaseBackupFailed(f"base backup of {self.target} ended without a complete tar and backup_manifest")
        yield tail[: -len(TAR_END)]
        member = tarfile.TarInfo(BACKUP_MANIFEST)
        member.size, member.mode, member.mtime = len(manifest), 0o600, int(time.time())
        yield member.tobuf(format=tarfile.USTAR_FORMAT) + bytes(manifest) + b"\0" * (-len(manifest) % 512)
        yield TAR_END
