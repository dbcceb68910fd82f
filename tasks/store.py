"""Store steps: read the inventory (manifests only), write a manifest last, clean up a failed set."""

from __future__ import annotations

import difflib
import os
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.backends import private_makedirs
from blocks.errors import BackupNotFound, ChecksumMismatch, StagingCancelled, StoreError
from blocks.store import BackupStore, StoreClient
from tasks.archive import ArchiveDigest
from tasks.log import run_logger
from tasks.manifest import (
    Manifest,
    Part,
    Verification,
    complete_set_ids,
    human_size,
    is_set_id,
    manifest_key,
    set_prefix,
    verification_key,
)
from tasks.retry import retry_transient
from tasks.staging import StagingProgress
from tasks.stream import CHUNK, open_decompressed_reader


def list_sets(client: StoreClient) -> list[Manifest]:
    """Every complete set (one with a manifest), oldest first. Sets without a manifest do not exist."""
    ids = complete_set_ids([o.key for o in client.list("backups/")])
    return [read_manifest(client, set_id) for set_id in ids]


def read_manifest(client: StoreClient, set_id: str) -> Manifest:
    key = manifest_key(set_id)
    manifest = Manifest.from_bytes(client.get_bytes(key), where=f"{client.description}/{key}")
    if manifest.set_id != set_id:
        raise StoreError(f"{client.description}/{key} describes set {manifest.set_id}, not {set_id}")
    return manifest


def read_verification(client: StoreClient, set_id: str, *, keys: Iterable[str] | None = None) -> Verification | None:
    """The newest restore drill's record of a set, or None if it was never drilled.

    ``keys``: a listing already made (saves a request per set). A record that names another set is an error.
    """
    key = verification_key(set_id)
    if not (key in keys if keys is not None else client.exists(key)):
        return None
    where = f"{client.description}/{key}"
    record = Verification.from_bytes(client.get_bytes(key), where=where)
    if record.set_id != set_id:
        raise StoreError(f"{where} describes set {record.set_id}, not {set_id}")
    return record


def find_set(client: StoreClient, wanted: str, *, prefer_verified: bool = False) -> Manifest:
    """The set with id ``wanted``, or ``latest`` (the newest complete set; with ``prefer_verified``
    the newest whose last drill passed, if any). An unknown id names the nearest existing ones."""
    keys = [o.key for o in client.list("backups/")]
    ids = complete_set_ids(keys)
    if wanted == "latest":
        if not ids:
            raise BackupNotFound(f"no complete backup set in {client.description}")
        if prefer_verified:
            verified = [i for i in ids if verification_key(i) in keys and _drill_passed(client, i)]
            if verified:
                return read_manifest(client, verified[-1])
            run_logger().warning("no verified set in %s; using the newest complete one", client.description)
        return read_manifest(client, ids[-1])
    if wanted in ids:
        return read_manifest(client, wanted)
    nearest = difflib.get_close_matches(wanted, ids, n=3, cutoff=0.0) if ids else []
    hint = f"; nearest: {', '.join(nearest)}" if nearest else "; the store has no complete set"
    what = "no complete backup set" if is_set_id(wanted) else "not a backup set id"
    raise BackupNotFound(f"{what} {wanted!r} in {client.description}{hint}")


@task(retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def find_backup_set(store: BackupStore, wanted: str, *, prefer_verified: bool = False) -> Manifest:
    """``find_set`` in the store: the set a restore or drill works from (``latest`` or a set id)."""
    manifest = find_set(store.get_client(), wanted, prefer_verified=prefer_verified)
    run_logger().info("backup set %s (%s) in %s", manifest.set_id, wanted, store.get_client().description)
    return manifest


def _drill_passed(client: StoreClient, set_id: str) -> bool:
    record = read_verification(client, set_id)
    return record is not None and record.ok


@dataclass(frozen=True)
class StagedPart:
    """A part downloaded, checked against the manifest and decompressed to a local file."""

    key: str
    path: str
    raw_size: int
    seconds: float
    data_offsets: int = 0  # custom-format dumps: data blocks whose offset was written into the TOC


def staging_path(staging_dir: str, key: str) -> Path:
    """Where a part is staged: ``staging_dir/<key without .zst>``, resolved and confined to ``staging_dir``.
    A key that would land anywhere else (``..``, absolute, a symlink out) is refused before anything is opened."""
    root = Path(staging_dir).resolve()
    if "\0" in key:
        problem = "holds a NUL"
    elif key.startswith("/") or ".." in key.split("/"):
        problem = "is absolute or has a '..' segment"
    else:
        target = (root / key.removesuffix(".zst")).resolve()
        if target != root and target.is_relative_to(root):
            return target
        problem = "resolves outside the staging directory"
    raise StoreError(f"part key {key[:200]!r} {problem} ({root}); nothing was staged")


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE, retry_condition_fn=retry_transient,
      task_run_name="stage-{part.kind}-{part.name}")
def stage_part(part: Part, store: BackupStore, staging_dir: str, cancel: threading.Event | None = None,
               progress: StagingProgress | None = None) -> StagedPart:
    """Download one part, check size and sha256, and decompress it into ``staging_dir``; setting ``cancel``
    stops it (StagingCancelled) and removes what it wrote. ``progress`` is told how far it got, for a restore
    that follows the download (``tasks.pg_load``).

    The checksum is known good before anything is restored; a mismatch removes the file and raises
    ChecksumMismatch, with every target untouched. A custom-format dump (written by ``pg_dump`` to a pipe,
    so without data offsets) gets every data block's offset written into its table of contents, found by
    the dump scanner on the way in, so ``pg_restore -j`` seeks to each table's data.
    """
    log = run_logger()
    started = time.monotonic()
    target = staging_path(staging_dir, part.key)
    client = store.get_client()
    private_makedirs(target.parent)
    scan = part.kind == "postgres" and part.tool.startswith("pg_dump -Fc")
    if progress is not None:
        progress.begin(str(target))
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        with open(fd, "wb") as out, open_decompressed_reader(client, part.key, sha256=part.sha256,
                                                             size=part.size) as src:
            writer = _BesideWriter(out, scan=scan, progress=progress)
            try:
                while chunk := src.read(CHUNK):
                    if cancel is not None and cancel.is_set():
                        raise StagingCancelled(f"{part.key}: download stopped, the recovery no longer needs it")
                    writer.put(chunk)
            except BaseException:
                writer.abandon()
                raise
            writer.close()
    except BaseException as exc:
        target.unlink(missing_ok=True)
        if progress is not None:
            progress.end(None, exc)
        raise
    found = writer.found
    try:
        size = target.stat().st_size
        if size != part.raw_size:
            target.unlink(missing_ok=True)
            raise ChecksumMismatch(f"{part.key}: decompressed to {size} bytes, manifest says {part.raw_size}")
        offsets = _record_data_offsets(target, found, part.key) if found is not None else 0
    except BaseException as exc:
        if progress is not None:
            progress.end(None, exc)
        raise
    seconds = round(time.monotonic() - started, 3)
    log.info("staged %s (%s, sha256 verified) in %.1f s", part.key, human_size(size), seconds)
    staged = StagedPart(key=part.key, path=str(target), raw_size=size, seconds=seconds, data_offsets=offsets)
    if progress is not None:
        progress.end(staged, None)
    return staged


class _BesideWriter:
    """Writes the decompressed part to its staged file, and with ``scan`` follows the archive's blocks, in a
    thread of its own while the download and decompression go on (file writes and the scanner release the
    GIL, so this takes the core the download leaves idle)."""

    def __init__(self, out: BinaryIO, *, scan: bool, progress: StagingProgress | None = None) -> None:
        self.out = out
        self.progress = progress
        self.written = 0
        self.digest = ArchiveDigest(hash_rows=False, on_head=progress.found_head if progress else None,
                                    on_block=progress.found_block if progress else None) if scan else None
        self.scan_error: Exception | None = None
        self.write_error: BaseException | None = None
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self.thread = threading.Thread(target=self._work, name="stage-write", daemon=True)
        self.thread.start()

    def put(self, chunk: bytes) -> None:
        if self.write_error is not None:
            raise self.write_error
        self.queue.put(chunk)

    def _work(self) -> None:
        while (chunk := self.queue.get()) is not None:
            if self.write_error is not None:
                continue  # drain: the feeder must never block on a full queue
            try:
                self.out.write(chunk)
                if self.progress is not None:
                    self.out.flush()
            except BaseException as exc:  # noqa: BLE001 - raised in the feeder's thread
                self.write_error = exc
                continue
            self.written += len(chunk)
            if self.progress is not None:
                self.progress.wrote(self.written)
            if self.digest is not None and self.scan_error is None:
                try:
                    self.digest.feed(chunk)
                except Exception as exc:  # noqa: BLE001 - reported by found; the staging itself goes on
                    self.scan_error = exc

    def close(self) -> None:
        """Wait for every chunk to be written; raises the write's error, if any."""
        self.queue.put(None)
        self.thread.join()
        if self.write_error is not None:
            raise self.write_error

    def abandon(self) -> None:
        """Stop writing (the chunks still queued are dropped) and wait for the thread."""
        self.write_error = self.write_error or OSError("staging abandoned")
        self.queue.put(None)
        self.thread.join()

    @property
    def found(self) -> ArchiveDigest | Exception | None:
        """The blocks the scanner followed (or why it stopped); None without ``scan``."""
        return self.scan_error if self.scan_error is not None else self.digest


def _record_data_offsets(path: Path, found: ArchiveDigest | Exception, key: str) -> int:
    """Write the data-block offsets the scanner found into the staged archive's TOC; the count written."""
    try:
        if isinstance(found, Exception):
            raise found
        writes = found.toc_offsets()
    except Exception as exc:  # noqa: BLE001 - the offsets only speed pg_restore up; it finds blocks without them
        run_logger().warning("%s: %s; pg_restore will read through the data blocks to find each table", key, exc)
        return 0
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        for position, data in writes:
            os.pwrite(fd, data, position)
    finally:
        os.close(fd)
    return len(writes)


@task(retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def record_verification(store: BackupStore, verification: Verification) -> str:
    """Write ``verification.json`` beside the manifest (replacing an older drill's record)."""
    client = store.get_client()
    if not client.exists(manifest_key(verification.set_id)):
        raise BackupNotFound(f"set {verification.set_id} has no manifest in {client.description}")
    key = verification_key(verification.set_id)
    client.put_bytes(key, verification.to_bytes(), overwrite=True)
    run_logger().info("recorded drill of %s: %s", verification.set_id, "ok" if verification.ok else "FAILED")
    return key


@task(retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def write_manifest(store: BackupStore, manifest: Manifest) -> str:
    """Check every part is in the store with its recorded size, then write the manifest, last."""
    client = store.get_client()
    stored = {o.key: o.size for o in client.list(set_prefix(manifest.set_id))}
    for part in manifest.parts:
        if stored.get(part.key) != part.size:
            raise StoreError(
                f"store {client.description}: part {part.key} is {stored.get(part.key)} bytes, "
                f"expected {part.size}; manifest not written"
            )
    key = manifest_key(manifest.set_id)
    client.put_bytes(key, manifest.to_bytes())
    run_logger().info("backup set %s complete: %d parts, %s in %s", manifest.set_id, len(manifest.parts),
                      human_size(manifest.size), client.description)
    return key


@task(retries=4, retry_delay_seconds=[2, 5, 10, 20], cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def discard_incomplete_set(store: BackupStore, set_id: str) -> int:
    """After a failed run: abort its multipart uploads and delete its parts. Never touches a manifest."""
    client = store.get_client()
    prefix = set_prefix(set_id)
    if client.exists(manifest_key(set_id)):
        raise StoreError(f"set {set_id} has a manifest; refusing to discard it")
    aborted = client.abort_incomplete_uploads(prefix)
    removed = 0
    for obj in client.list(prefix):
        client.delete(obj.key)
        removed += 1
    run_logger().info("discarded incomplete set %s in %s: %d parts deleted, %d uploads aborted",
                      set_id, client.description, removed, aborted)
    return removed + aborted
