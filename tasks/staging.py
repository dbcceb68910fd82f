"""``StagingProgress``: how far ``stage_part`` has written a part, for a restore that follows the download
instead of waiting for its end (``tasks.pg_load``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from blocks.errors import StoreError
from tasks.archive import ArchiveHead

if TYPE_CHECKING:
    from tasks.store import StagedPart

T = TypeVar("T")


class StagingRestarted(StoreError):
    """The download failed or started over (a retry after a transient error): what followed it must wait for
    the task's final result and start again from the finished file."""


@dataclass(frozen=True)
class Block:
    """One data block of a staged custom-format archive: where it lies in the file."""

    dump_id: int
    start: int
    end: int


class StagingProgress:
    """Shared between the thread that stages a part and those that follow it.

    The writer side reports each attempt's start, the bytes on disk, the archive's table of contents and each
    finished data block, then the end (the checked part, or the error). Bytes are reported only once they are
    in the file, so a reader may read anything below ``written``.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.attempts = 0
        self.path = ""
        self.written = 0
        self.head: ArchiveHead | None = None
        self.head_bytes = b""  # the archive up to its first data block, as pg_dump wrote it
        self.blocks: dict[int, Block] = {}  # by start position
        self.staged: StagedPart | None = None
        self.error: BaseException | None = None

    # ------------------------------------------------------------------------------------ writer side

    def begin(self, path: str) -> None:
        with self.cond:
            self.attempts += 1
            self.path, self.written, self.head, self.head_bytes, self.blocks = path, 0, None, b"", {}
            self.staged, self.error = None, None
            self.cond.notify_all()

    def wrote(self, total: int) -> None:
        with self.cond:
            self.written = total
            self.cond.notify_all()

    def found_head(self, head: ArchiveHead, head_bytes: bytes) -> None:
        with self.cond:
            self.head, self.head_bytes = head, head_bytes
            self.cond.notify_all()

    def found_block(self, dump_id: int, start: int, end: int) -> None:
        with self.cond:
            self.blocks[start] = Block(dump_id, start, end)
            self.cond.notify_all()

    def end(self, staged: StagedPart | None, error: BaseException | None) -> None:
        with self.cond:
            self.staged, self.error = staged, error
            self.cond.notify_all()

    # ------------------------------------------------------------------------------------ reader side

    @property
    def ended(self) -> bool:
        return self.staged is not None or self.error is not None

    def wait_for(self, ready: Callable[[], T | None], *, attempt: int | None = None) -> T | None:
        """Under the lock, wait until ``ready()`` gives something, or the staging ended (then ``ready()``'s
        last answer, maybe None). Raises StagingRestarted if the download failed, or once a newer attempt than
        ``attempt`` began."""
        with self.cond:
            while True:
                if attempt is not None and self.attempts != attempt:
                    raise StagingRestarted(f"the download of {self.path} started over")
                if self.error is not None:
                    raise StagingRestarted(f"the download of {self.path} failed: {self.error}")
                value = ready()
                if value is not None or self.ended:
                    return value
                self.cond.wait()

    def wait_done(self) -> StagedPart:
        """The staged part once the whole download is in and checked; StagingRestarted if it failed."""
        staged = self.wait_for(lambda: self.staged)
        assert staged is not None
        return staged
