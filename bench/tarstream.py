"""Following a base-backup tar as it streams: tasks/pitr/tar.py's TarStream against ``tarfile``'s stream mode.

Both read the same tar (the shape of a PostgreSQL data directory: many 8 KiB files and a few 1 GiB-style
segments, scaled down) from 1 MiB chunks, list every regular file with its size, and keep ``backup_label``;
"hashing" also takes the sha256 of every member (what verify_base_backup does with a SHA256 manifest).
Rounds alternate, the median is reported with the ratio; the table goes to docs/benchmarks-tarstream.md.

    .venv/bin/python bench/tarstream.py [--mib 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import statistics
import tarfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from tasks.pitr.tar import TarStream

CHUNK = 1024 * 1024
COMMAND = ".venv/bin/python bench/tarstream.py"
PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-tarstream.md"


def make_tar(total_mib: int) -> bytes:
    """A tar like a data directory: 3/4 of the bytes in 16 MiB segment files, the rest in 8 KiB files."""
    out = io.BytesIO()
    random = os.urandom(CHUNK)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as archive:
        def add(name: str, size: int) -> None:
            member = tarfile.TarInfo(name)
            member.size = size
            data = (random * (size // CHUNK + 1))[:size]
            archive.addfile(member, io.BytesIO(data))

        add("backup_label", 200)
        big = total_mib * 3 // 4 // 16
        for n in range(big):
            add(f"base/16384/{16400 + n}", 16 * CHUNK)
        for n in range((total_mib - big * 16) * 128):
            add(f"base/16384/{20000 + n}", 8192)
    return out.getvalue()


def chunks(data: bytes) -> Iterator[memoryview]:
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        yield view[start:start + CHUNK]


class ChunkReader(io.RawIOBase):
    """The chunk iterator as a file object, for tarfile (the form take_base_backup would need)."""

    def __init__(self, source: Iterator[memoryview]) -> None:
        self.source = source
        self.pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self.pending:
            try:
                self.pending = next(self.source)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


def with_tarstream(data: bytes, hashing: bool) -> dict[str, tuple[int, str | None]]:
    tar = TarStream(capture=("backup_label",), hash_members=hashing)
    for chunk in chunks(data):
        tar.feed(chunk)
    assert tar.ended and "backup_label" in tar.captured
    return tar.files


def with_tarfile(data: bytes, hashing: bool) -> dict[str, tuple[int, str | None]]:
    files: dict[str, tuple[int, str | None]] = {}
    source = io.BufferedReader(ChunkReader(chunks(data)), CHUNK)
    with tarfile.open(fileobj=source, mode="r|") as archive:
        for member in archive:
            if not member.isfile():
                continue
            digest = None
            if hashing or member.name == "backup_label":
                handle = archive.extractfile(member)
                assert handle is not None
                hasher = hashlib.sha256()
                while block := handle.read(CHUNK):
                    hasher.update(block)
                digest = hasher.hexdigest() if hashing else None
            files[member.name] = (member.size, digest)
    return files


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    data = make_tar(args.mib)
    rows = []
    for hashing in (False, True):
        assert with_tarstream(data, hashing) == with_tarfile(data, hashing)  # same answer before timing
        times: dict[str, list[float]] = {"TarStream": [], "tarfile r|": []}
        for _ in range(args.rounds):
            for name, fn in (("TarStream", with_tarstream), ("tarfile r|", with_tarfile)):
                started = time.perf_counter()
                fn(data, hashing)
                times[name].append(time.perf_counter() - started)
        ours, library = statistics.median(times["TarStream"]), statistics.median(times["tarfile r|"])
        rows.append((hashing, ours, library))
    members = len(with_tarstream(data, False))
    lines = [
        "# Benchmark: following a base-backup tar (TarStream vs tarfile's stream mode)",
        "",
        f"Command: `{COMMAND} --mib {args.mib} --rounds {args.rounds}` ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}); a {len(data) >> 20} MiB "
        f"tar of {members} files, fed in 1 MiB chunks, median of {args.rounds} rounds. The machine is shared: "
        "other work runs at the same time.",
        "",
        "| what | TarStream (s) | tarfile stream mode (s) | tarfile / TarStream |",
        "|---|---|---|---|",
    ]
    for hashing, ours, library in rows:
        what = "names and sizes + sha256 of every member" if hashing else "names and sizes, backup_label kept"
        lines.append(f"| {what} | {ours:.3f} | {library:.3f} | {library / ours:.2f}x |")
    text = "\n".join(lines) + "\n"
    PAGE.write_text(text)
    print(text)

if __name__ == "__main__":
    main()
