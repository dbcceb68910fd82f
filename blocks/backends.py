"""The two backup store backends behind one small streaming interface (no Prefect import: the WAL
archiving commands use them and must start fast).

put (a writer that commits on success and leaves nothing on failure), get (a reader), list, exists,
delete. The local directory is the embedded default; S3 goes through boto3 multipart uploads with a
bounded number of parts in memory.
"""

from __future__ import annotations

import io
import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from blocks.errors import ConfigurationError, ObjectExists, StoreError

DEFAULT_STORE_DIR = "/var/backups/runbooks"
DEFAULT_STORE = f"file://{DEFAULT_STORE_DIR}"  # where backups go when no store is given (flows, the CLI)

MiB = 1024 * 1024
_PARTIAL = ".partial-"


@dataclass(frozen=True)
class StoredObject:
    """One object in a store, key relative to the store's root."""

    key: str
    size: int
    modified: datetime


class ObjectWriter(Protocol):
    def write(self, data: bytes | memoryview) -> int: ...


class StoreClient(Protocol):
    """What every backend offers. Keys are relative, '/'-separated."""

    description: str

    def open_write(self, key: str, *, overwrite: bool = False) -> Any: ...
    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> None: ...
    def open_read(self, key: str) -> Any: ...
    def get_bytes(self, key: str) -> bytes: ...
    def list(self, prefix: str = "") -> list[StoredObject]: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def abort_incomplete_uploads(self, prefix: str = "", *, older_than: timedelta | None = None) -> int: ...


# ---------------------------------------------------------------------------------------- store URLs

S3_URL_OPTIONS = ("endpoint_url", "region", "sse", "kms_key_id", "storage_class", "part_size_mib",
                  "max_concurrency")


@dataclass(frozen=True)
class StoreURL:
    """A parsed store URL: a local directory, or an S3 bucket/prefix with its query options (as strings)."""

    backend: Literal["local", "s3"]
    path: str = ""
    bucket: str = ""
    prefix: str = ""
    options: dict[str, str] = field(default_factory=dict)


def parse_store_url(url: str, *, credentials_hint: str = "the Block or the environment") -> StoreURL:
    """``file:///dir``, a plain path, or ``s3://bucket/prefix?endpoint_url=...&region=...``.

    Defaults and value checks are the caller's (the Block and the WAL commands differ). S3 credentials in
    the URL are refused; ``credentials_hint`` says where they go instead.
    """
    parts = urlsplit(url)
    if parts.scheme in ("", "file"):
        path = unquote(parts.path if parts.scheme else url)
        if not path:
            raise ConfigurationError(f"store URL {url!r} has no path")
        return StoreURL("local", path=path)
    if parts.scheme != "s3":
        raise ConfigurationError(
            f"unknown store URL scheme {parts.scheme!r}; use file:///dir or s3://bucket/prefix?..."
        )
    if parts.username or parts.password:
        raise ConfigurationError(f"put S3 credentials in {credentials_hint}, not in the URL")
    if not parts.hostname:
        raise ConfigurationError(f"store URL {url!r} names no bucket")
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = sorted(set(options) - set(S3_URL_OPTIONS))
    if unknown:
        raise ConfigurationError(f"unknown S3 store option(s) {unknown}; known: {sorted(S3_URL_OPTIONS)}")
    return StoreURL("s3", bucket=parts.hostname, prefix=parts.path.strip("/"), options=options)


# --------------------------------------------------------------------------------------------- local


class LocalStore:
    """A directory. Objects are written under a temporary name, fsynced, then renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"file://{root}"

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ConfigurationError(f"bad object key {key!r}")
        return self.root / key

    @contextmanager
    def open_write(self, key: str, *, overwrite: bool = False) -> Iterator[BinaryIO]:
        final = self._path(key)
        if not overwrite and final.exists():
            raise ObjectExists(f"store {self.description}: {key} already exists; not overwritten")
        try:
            private_makedirs(final.parent)
            tmp = final.with_name(f"{final.name}{_PARTIAL}{uuid.uuid4().hex[:8]}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.fchmod(fd, 0o600)  # 0600 whatever the umask: dumps hold data and password hashes
            handle = open(fd, "wb")  # noqa: SIM115 - closed below on every path
        except OSError as exc:
            raise StoreError(f"store {self.description}: cannot write {key}: {exc}") from exc
        try:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            if overwrite:
                os.replace(tmp, final)
            else:
                try:
                    os.link(tmp, final)  # atomic create-if-absent
                except FileExistsError:
                    raise ObjectExists(
                        f"store {self.description}: {key} appeared while writing; not overwritten"
                    ) from None
                os.unlink(tmp)
            _fsync_dir(final.parent)
        except OSError as exc:
            raise StoreError(f"store {self.description}: cannot write {key}: {exc}") from exc
        finally:
            if not handle.closed:
                handle.close()
            tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        with self.open_write(key, overwrite=overwrite) as out:
            out.write(data)

    @contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        try:
            handle = open(self._path(key), "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise StoreError(f"store {self.description}: no object {key}") from None
        with handle:
            yield handle

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as src:
            return src.read()

    def list(self, prefix: str = "") -> list[StoredObject]:
        found: list[StoredObject] = []
        if not self.root.is_dir():
            return found
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if _PARTIAL in name:
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    stat = path.stat()
                    found.append(StoredObject(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC)))
        return sorted(found, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def abort_incomplete_uploads(self, prefix: str = "", *, older_than: timedelta | None = None) -> int:
        """Remove temporary files of unfinished writes; ``older_than``: only those untouched that long."""
        removed = 0
        if not self.root.is_dir():
            return removed
        cutoff = datetime.now(UTC) - older_than if older_than is not None else None
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                path = Path(dirpath) / name
                if _PARTIAL in name and path.relative_to(self.root).as_posix().startswith(prefix):
                    if cutoff is not None and _mtime(path) > cutoff:
                        continue
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed


def private_makedirs(path: Path) -> None:
    """``mkdir -p`` where every directory created is 0700 whatever the umask; existing ones are left as they are."""
    missing = []
    for parent in [path, *path.parents]:
        if parent.is_dir():
            break
        missing.append(parent)
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made meanwhile by another writer
        os.chmod(directory, 0o700)


def _mtime(path: Path) -> datetime:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except FileNotFoundError:  # finished or removed since the walk: not ours to count
        return datetime.max.replace(tzinfo=UTC)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ S3


class S3Store:
    """An S3 bucket/prefix. Large objects go up as multipart uploads, a few parts in flight."""

    def __init__(
        self,
        client: Any,
        *,
        bucket: str,
        prefix: str,
        description: str,
        part_size: int,
        max_concurrency: int,
        put_extra: dict[str, str],
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.description = description
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.put_extra = put_extra

    def _key(self, key: str) -> str:
        if not key or key.startswith("/"):
            raise ConfigurationError(f"bad object key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, action: str, key: str, exc: BaseException) -> StoreError:
        return StoreError(f"store {self.description}: {action} {key} failed: {_short(exc)}")

    @contextmanager
    def open_write(self, key: str, *, overwrite: bool = False) -> Iterator[_MultipartWriter]:
        if not overwrite and self.exists(key):
            raise ObjectExists(f"store {self.description}: {key} already exists; not overwritten")
        writer = _MultipartWriter(self, self._key(key))
        try:
            yield writer
            writer.complete()
        except BaseException as exc:
            writer.abort()
            if isinstance(exc, StoreError) or not _is_client_error(exc):
                raise
            raise self._fail("upload of", key, exc) from exc

    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        args = {"Bucket": self.bucket, "Key": self._key(key), "Body": data, **self.put_extra}
        if not overwrite:
            args["IfNoneMatch"] = "*"  # create-if-absent where the server supports it
        try:
            if not overwrite and self.exists(key):
                raise ObjectExists(f"store {self.description}: {key} already exists; not overwritten")
            self.client.put_object(**args)
        except StoreError:
            raise
        except Exception as exc:  # botocore raises many unrelated types
            if _error_code(exc) in ("PreconditionFailed", "412"):
                raise ObjectExists(f"store {self.description}: {key} already exists") from None
            raise self._fail("upload of", key, exc) from exc

    @contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except Exception as exc:
            if _error_code(exc) in ("NoSuchKey", "404"):
                raise StoreError(f"store {self.description}: no object {key}") from None
            raise self._fail("download of", key, exc) from exc
        try:
            yield _ErrorNamingReader(body, self, key)
        finally:
            body.close()

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as src:
            return src.read()

    def list(self, prefix: str = "") -> list[StoredObject]:
        found: list[StoredObject] = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix) if prefix else (self.prefix + "/" if strip else "")
            )
            for page in pages:
                for item in page.get("Contents", []):
                    found.append(StoredObject(item["Key"][strip:], item["Size"], item["LastModified"]))
        except Exception as exc:
            raise self._fail("listing", prefix or "/", exc) from exc
        return found

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail("checking", key, exc) from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._fail("deleting", key, exc) from exc

    def abort_incomplete_uploads(self, prefix: str = "", *, older_than: timedelta | None = None) -> int:
        """Abort multipart uploads under ``prefix``; ``older_than``: only those initiated that long ago."""
        aborted = 0
        full = self._key(prefix) if prefix else self.prefix
        cutoff = datetime.now(UTC) - older_than if older_than is not None else None
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    if cutoff is not None and upload["Initiated"] > cutoff:
                        continue
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted += 1
        except Exception as exc:
            raise self._fail("aborting uploads under", prefix or "/", exc) from exc
        return aborted


MMAP_THRESHOLD = 4 * 1024 * 1024
FIRST_BUFFER = MMAP_THRESHOLD  # where a big part size's first part starts (it doubles up to the part size)
WHOLE_FIRST_PART = 16 * 1024 * 1024  # part sizes up to this are allocated whole from the first part on
_heap_tuned = False


def _map_big_buffers() -> bool:
    """Have glibc give part-sized buffers their own mappings, returned to the OS when freed.

    By default glibc raises its mmap threshold after the first large free, so later 8 MiB parts come
    from the heap (zeroed by hand, kept by the process afterwards). Measured with 160 MiB uploads of 8 MiB
    parts: peak 171-178 MiB either way, but 23 MiB stay with the process after the upload by default and
    8 MiB with this fixed 4 MiB threshold. Once per process; False where there is no glibc.
    """
    global _heap_tuned
    if _heap_tuned:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _heap_tuned = bool(libc.mallopt(-3, MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
    return _heap_tuned


class _MultipartWriter:
    """File-like writer: buffers one part, uploads up to ``max_concurrency`` parts in background threads.

    Memory stays at (max_concurrency + 1) parts. Small objects become one put_object. The part size
    doubles every 1000 parts so an object can grow past 10,000 x part_size.
    """

    def __init__(self, store: S3Store, key: str) -> None:
        _map_big_buffers()  # before the first buffer
        self.store = store
        self.key = key
        self.part_size = store.part_size
        # Parts are allocated whole and filled in place, and a full part is handed to the upload as it is. With
        # parts over 16 MiB the first one starts at 4 MiB and doubles as it fills, so a small object never pays
        # for zero-filling a whole part (for a WAL segment that would cost more than compressing and PUTting it).
        # Parts of 16 MiB or less (the backups' 8 MiB) start whole: growing them gains little and would change
        # the backups' peak memory.
        # (Buffers of 4 MiB and up are mmapped, see _map_big_buffers: a grown-out buffer goes back to the OS.)
        self.buffer = bytearray(self.part_size if self.part_size <= WHOLE_FIRST_PART else FIRST_BUFFER)
        self.filled = 0
        self.upload_id: str | None = None
        self.parts: list[Future[dict[str, Any]]] = []
        self.pool: ThreadPoolExecutor | None = None
        self.slots = threading.BoundedSemaphore(store.max_concurrency)
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            if self.filled == len(self.buffer):
                if self.upload_id is None and len(self.buffer) < self.part_size:
                    self._grow_first_part()
                else:
                    self._flush_part()
            take = min(len(view) - done, len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + take] = view[done:done + take]
            self.filled += take
            done += take
        return done

    def _grow_first_part(self) -> None:
        bigger = bytearray(min(2 * len(self.buffer), self.part_size))
        bigger[:self.filled] = self.buffer
        self.buffer = bigger

    def _flush_part(self) -> None:
        client = self.store.client
        if self.upload_id is None:
            self.upload_id = client.create_multipart_upload(
                Bucket=self.store.bucket, Key=self.key, **self.store.put_extra
            )["UploadId"]
            self.pool = ThreadPoolExecutor(self.store.max_concurrency, thread_name_prefix="s3-part")
        for done in [f for f in self.parts if f.done()]:
            done.result()  # surface a failed part early
        body = self.buffer if self.filled == len(self.buffer) else self.buffer[:self.filled]
        number = len(self.parts) + 1
        if number % 1000 == 0:
            self.part_size *= 2
        self.buffer = bytearray(self.part_size)
        self.filled = 0
        self.slots.acquire()
        assert self.pool is not None
        self.parts.append(self.pool.submit(self._upload_part, number, body))

    def _upload_part(self, number: int, body: bytearray) -> dict[str, Any]:
        try:
            response = self.store.client.upload_part(
                Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=body
            )
            return {"PartNumber": number, "ETag": response["ETag"]}
        finally:
            self.slots.release()

    def complete(self) -> None:
        client = self.store.client
        if self.upload_id is None:
            client.put_object(
                Bucket=self.store.bucket, Key=self.key,
                Body=self.buffer if self.filled == len(self.buffer) else self.buffer[:self.filled],
                **self.store.put_extra,
            )
            self.closed = True
            return
        if self.filled:
            self._flush_part()
        done = [f.result() for f in self.parts]
        client.complete_multipart_upload(
            Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
            MultipartUpload={"Parts": done},
        )
        self.closed = True
        self._shutdown()

    def abort(self) -> None:
        """Best effort: if the endpoint is down this fails too; the flow's cleanup retries later."""
        self._shutdown()
        if self.upload_id is not None and not self.closed:
            try:
                self.store.client.abort_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id
                )
            except Exception:  # noqa: BLE001 - the original error is what the caller reports
                pass
        self.closed = True

    def _shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


class _ErrorNamingReader(io.RawIOBase):
    """Wraps a botocore StreamingBody so read errors name the store and key."""

    def __init__(self, body: Any, store: S3Store, key: str) -> None:
        self.body = body
        self.store = store
        self.key = key

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            return self.body.read(None if size is None or size < 0 else size)
        except Exception as exc:
            raise self.store._fail("download of", self.key, exc) from exc

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _is_client_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith(("botocore", "boto3", "urllib3"))


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


def make_s3_store(
    *,
    bucket: str,
    prefix: str,
    description: str,
    endpoint_url: str | None,
    region: str | None,
    access_key_id: str | None,
    secret_access_key: str | None,
    session_token: str | None,
    sse: str,
    kms_key_id: str | None,
    storage_class: str | None,
    part_size: int,
    max_concurrency: int,
) -> S3Store:
    """An S3Store with a boto3 client; credentials None: boto3's default chain."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        aws_session_token=session_token,
        region_name=region,
    )
    client = session.client(
        "s3",
        endpoint_url=endpoint_url,
        config=Config(
            retries={"max_attempts": 4, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=max_concurrency + 4,
            s3={"addressing_style": "path"} if endpoint_url else None,
        ),
    )
    extra: dict[str, str] = {}
    if sse:
        extra["ServerSideEncryption"] = sse
    if kms_key_id:
        extra["SSEKMSKeyId"] = kms_key_id
    if storage_class:
        extra["StorageClass"] = storage_class
    return S3Store(
        client, bucket=bucket, prefix=prefix, description=description, part_size=part_size,
        max_concurrency=max_concurrency, put_extra=extra,
    )
