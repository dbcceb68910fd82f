"""Files steps: tar a directory into the store (streamed, hashed per file) and extract it back."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.errors import ConfigurationError, PreflightFailed, VerificationFailed
from blocks.store import BackupStore
from tasks.log import run_logger
from tasks.manifest import FilesSummary, Part, part_key
from tasks.progress import Progress
from tasks.retry import retry_transient
from tasks.stream import CHUNK, open_compressed_writer, open_decompressed_reader

_MOD = 2**256


class TreeDigest:
    """Order-independent digest of a directory tree: files (path + content) and symlinks (path + target)."""

    def __init__(self) -> None:
        self.total = 0
        self.files = 0
        self.bytes = 0

    def add_file(self, relpath: str, content_sha256: str, size: int) -> None:
        self._add(b"f\0" + relpath.encode() + b"\0" + content_sha256.encode())
        self.files += 1
        self.bytes += size

    def add_symlink(self, relpath: str, target: str) -> None:
        self._add(b"l\0" + relpath.encode() + b"\0" + target.encode())

    def _add(self, record: bytes) -> None:
        self.total = (self.total + int.from_bytes(hashlib.sha256(record).digest(), "big")) % _MOD

    def summary(self) -> FilesSummary:
        return FilesSummary(files=self.files, bytes=self.bytes, digest=f"{self.total:064x}")


class _HashingFile:
    """Reads a file for tarfile while hashing it, so the content is read once."""

    def __init__(self, handle: object) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)  # type: ignore[attr-defined]
        self.digest.update(data)
        return data


def tree_digest(root: Path) -> FilesSummary:
    """Digest of a directory as it is on disk now (to compare a restore with the manifest)."""
    digest = TreeDigest()
    for relpath, path in _walk(root):
        if path.is_symlink():
            digest.add_symlink(relpath, os.readlink(path))
        elif path.is_file():
            sha = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    sha.update(chunk)
            digest.add_file(relpath, sha.hexdigest(), path.stat().st_size)
    return digest.summary()


def _walk(root: Path) -> list[tuple[str, Path]]:
    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(filenames) + [d for d in dirnames if (base / d).is_symlink()]:
            path = base / name
            entries.append((path.relative_to(root).as_posix(), path))
    return entries


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE, retry_condition_fn=retry_transient,
      task_run_name="archive-{path}")
def archive_directory(
    path: str, store: BackupStore, set_id: str, *, level: int = 3, threads: int = 2,
    progress: Progress | None = None,
) -> Part:
    """tar of one directory (paths relative to it) streamed through zstd into the store."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigurationError(f"{path} is not a directory on this host")
    key = part_key(set_id, "files", str(root))
    started = time.monotonic()
    digest = TreeDigest()
    result = []
    run_logger().info("archiving %s into %s", root, key)
    with open_compressed_writer(
        store.get_client(), key, level=level, threads=threads,
        on_progress=progress.advance if progress else None, result=result,
    ) as out:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for relpath, full in _walk(root):
                info = tar.gettarinfo(str(full), arcname=relpath)
                if info.isreg():
                    with open(full, "rb") as handle:
                        hashing = _HashingFile(handle)
                        tar.addfile(info, hashing)  # type: ignore[arg-type]
                    digest.add_file(relpath, hashing.digest.hexdigest(), info.size)
                elif info.issym():
                    tar.addfile(info)
                    digest.add_symlink(relpath, info.linkname)
                elif info.isdir():
                    tar.addfile(info)
    stored = result[0]
    summary = digest.summary()
    run_logger().info("archived %s: %d files, %d bytes -> %d stored", root, summary.files, summary.bytes,
                      stored.size)
    return Part(
        kind="files", name=str(root), key=key, size=stored.size, raw_size=stored.raw_size,
        sha256=stored.sha256, compression_level=level, tool=f"python tarfile {tarfile.version} (pax)",
        seconds=round(time.monotonic() - started, 3), files=summary,
    )


@dataclass(frozen=True)
class ExtractedFiles:
    path: str
    files: int
    bytes: int


@task(cache_policy=NO_CACHE)
def extract_archive(
    part: Part, store: BackupStore, destination: str, *, staged_tar: str | None = None
) -> ExtractedFiles:
    """Extract into a new directory ``destination`` (must not exist), via a staging dir renamed at the end.

    ``staged_tar``: the archive already downloaded and checked (``stage_part``); else it is fetched here.
    """
    dest = Path(destination)
    if dest.exists():
        raise ConfigurationError(f"{dest} already exists; extract into a new directory")
    staging = dest.with_name(f".{dest.name}.staging-{os.getpid()}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if staged_tar:
            with tarfile.open(staged_tar, mode="r:") as tar:
                tar.extractall(staging, filter="tar")
        else:
            with open_decompressed_reader(store.get_client(), part.key, sha256=part.sha256, size=part.size) as src:
                with tarfile.open(fileobj=src, mode="r|") as tar:
                    tar.extractall(staging, filter="tar")
        staging.mkdir(exist_ok=True)
        got = tree_digest(staging)
        if part.files is not None and got.digest != part.files.digest:
            raise VerificationFailed(f"files extracted from {part.key} differ from the manifest")
        os.rename(staging, dest)
    except BaseException:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    run_logger().info("extracted %s into %s (%d files)", part.key, dest, got.files)
    return ExtractedFiles(path=str(dest), files=got.files, bytes=got.bytes)



@dataclass(frozen=True)
class SwappedDirectory:
    path: str
    previous_kept_as: str | None


@task(cache_policy=NO_CACHE)
def swap_in_directory(new: str, live: str, keep_as: str) -> SwappedDirectory:
    """Move ``live`` aside to ``keep_as`` and ``new`` into its place (two renames on one filesystem).

    If the second rename fails, the first is undone, so ``live`` is never left missing.
    """
    new_path, live_path, aside = Path(new), Path(live), Path(keep_as)
    if aside.exists():
        raise ConfigurationError(f"{aside} already exists; nothing was changed")
    if new_path.parent.resolve() != live_path.parent.resolve() and os.stat(new_path.parent).st_dev != os.stat(
            live_path.parent).st_dev:
        raise ConfigurationError(f"{new} and {live} are on different filesystems; cannot swap atomically")
    moved = False
    if live_path.exists():
        os.rename(live_path, aside)
        moved = True
    try:
        os.rename(new_path, live_path)
    except OSError:
        if moved:
            os.rename(aside, live_path)
        raise
    run_logger().info("swapped restored files into %s (previous kept as %s)", live, keep_as if moved else "-")
    return SwappedDirectory(path=live, previous_kept_as=str(aside) if moved else None)


@task(cache_policy=NO_CACHE)
def preflight_directory_swap(new: str, live: str, keep_as: str) -> None:
    """Check, changing nothing, that ``swap_in_directory(new, live, keep_as)`` can run: ``new`` is there,
    ``keep_as`` is free, the parent of ``live`` is writable and on the same filesystem as ``new``."""
    new_path, live_path, aside = Path(new), Path(live), Path(keep_as)
    problems = []
    if not new_path.is_dir():
        problems.append(f"the restored copy {new} is missing")
    if aside.exists():
        problems.append(f"{aside} already exists")
    parent = live_path.parent
    if not parent.is_dir():
        problems.append(f"{parent} does not exist")
    elif not os.access(parent, os.W_OK | os.X_OK):
        problems.append(f"{parent} is not writable by this worker")
    elif new_path.exists() and os.stat(new_path.parent).st_dev != os.stat(parent).st_dev:
        problems.append(f"{new} and {live} are on different filesystems")
    if problems:
        raise PreflightFailed(f"directory {live} pre-flight: " + "; ".join(problems) + "; nothing was changed")


@task(cache_policy=NO_CACHE)
def swap_out_directory(new: str, live: str, keep_as: str) -> bool:
    """Undo of ``swap_in_directory``: the restored tree goes back to ``new`` and ``keep_as`` back to ``live``.
    A swap that never happened (``keep_as`` absent, ``new`` still there) is left alone; returns whether it
    renamed anything."""
    new_path, live_path, aside = Path(new), Path(live), Path(keep_as)
    if new_path.exists() or not (aside.exists() or live_path.exists()):
        return False
    if live_path.exists():
        os.rename(live_path, new_path)
    if aside.exists():
        os.rename(aside, live_path)
    run_logger().info("renamed %s back (the restored copy is at %s again)", live, new)
    return True


@task(cache_policy=NO_CACHE)
def remove_prepared_tree(path: str) -> bool:
    """Remove a directory this run extracted beside its target (never a live one); returns whether it existed."""
    target = Path(path)
    if not target.exists():
        return False
    shutil.rmtree(target)
    run_logger().info("removed the prepared copy %s", target)
    return True
