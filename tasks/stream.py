"""The data path: raw bytes -> multi-threaded zstd -> sha256 -> store writer, and back.

Memory stays at a few buffers whatever the size: nothing is ever held whole or staged in a temporary
full-size file.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard

from blocks.backends import StoreClient
from blocks.errors import ChecksumMismatch

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StreamResult:
    """What went into the store: stored size and sha256, and the uncompressed size."""

    size: int
    raw_size: int
    sha256: str
    seconds: float


class _HashingSink:
    """Counts and hashes what the compressor emits, then hands it to the store writer."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.digest.update(data)
        self.size += len(data)
        self.target.write(data)
        return len(data)

    def flush(self) -> None:
        pass


class CompressedWriter:
    """What ``open_compressed_writer`` yields: write raw bytes; ``raw_size`` so far."""

    def __init__(self, compressor: Any, on_progress: Callable[[int], None] | None) -> None:
        self._compressor = compressor
        self._on_progress = on_progress
        self.raw_size = 0

    def write(self, data: bytes | memoryview) -> int:
        self._compressor.write(data)
        self.raw_size += len(data)
        if self._on_progress is not None:
            self._on_progress(len(data))
        return len(data)


@contextmanager
def open_compressed_writer(
    store: StoreClient,
    key: str,
    *,
    level: int = 1,
    threads: int = 2,
    on_progress: Callable[[int], None] | None = None,
    result: list[StreamResult] | None = None,
) -> Iterator[CompressedWriter]:
    """Yield a writer that compresses into ``key``; the object exists only if the block ends cleanly.

    The StreamResult is appended to ``result`` once the object is committed.
    """
    started = time.monotonic()
    with store.open_write(key) as out:
        sink = _HashingSink(out)
        cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
        compressor = cctx.stream_writer(sink, closefd=False, write_size=CHUNK)
        writer = CompressedWriter(compressor, on_progress)
        yield writer
        compressor.flush(zstandard.FLUSH_FRAME)
        compressor.close()
    if result is not None:
        result.append(
            StreamResult(sink.size, writer.raw_size, sink.digest.hexdigest(), time.monotonic() - started)
        )


def compress_into_store(
    store: StoreClient,
    key: str,
    source: BinaryIO,
    *,
    level: int = 1,
    threads: int = 2,
    on_progress: Callable[[int], None] | None = None,
) -> StreamResult:
    """Copy a readable stream (e.g. a dump tool's stdout) into the store, compressed."""
    result: list[StreamResult] = []
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open_compressed_writer(
        store, key, level=level, threads=threads, on_progress=on_progress, result=result
    ) as writer:
        while True:
            count = source.readinto(view)  # type: ignore[attr-defined]
            if not count:
                break
            writer.write(view[:count])
    return result[0]


class _VerifyingReader:
    """Reads stored bytes, hashing them; ``finish`` drains the rest and compares with the manifest."""

    def __init__(self, raw: BinaryIO, key: str, expected_sha256: str, expected_size: int | None) -> None:
        self.raw = raw
        self.key = key
        self.expected_sha256 = expected_sha256
        self.expected_size = expected_size
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def finish(self) -> None:
        while self.read(CHUNK):
            pass
        if self.expected_size is not None and self.size != self.expected_size:
            raise ChecksumMismatch(
                f"{self.key}: {self.size} bytes stored, manifest says {self.expected_size}"
            )
        actual = self.digest.hexdigest()
        if actual != self.expected_sha256:
            raise ChecksumMismatch(f"{self.key}: sha256 {actual[:16]}... != manifest {self.expected_sha256[:16]}...")


@contextmanager
def open_decompressed_reader(
    store: StoreClient, key: str, *, sha256: str, size: int | None = None
) -> Iterator[BinaryIO]:
    """Yield the decompressed content of ``key``; on a clean exit, raise if it differs from the manifest.

    Callers that must not change anything before the check use ``verify_object`` first.
    """
    with store.open_read(key) as raw:
        checked = _VerifyingReader(raw, key, sha256, size)
        reader = zstandard.ZstdDecompressor().stream_reader(checked, read_size=CHUNK, closefd=False)
        try:
            yield reader  # type: ignore[misc]
            while reader.read(CHUNK):  # the consumer may stop before the end of the frame
                pass
        except zstandard.ZstdError as exc:
            # zstd's own frame checksum caught it before the end: the stored bytes are not what the
            # manifest's sha256 describes.
            raise ChecksumMismatch(f"{key}: stored data is corrupt ({exc}); it does not match the manifest's "
                                   "sha256") from None
        checked.finish()


def verify_object(store: StoreClient, key: str, *, sha256: str, size: int | None = None) -> None:
    """Read a stored object through and check its size and sha256 (no decompression)."""
    with store.open_read(key) as raw:
        checked = _VerifyingReader(raw, key, sha256, size)
        checked.finish()
