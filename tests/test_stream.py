"""The data path against the local store: compress, hash, commit-on-success, verify on the way back."""

import hashlib
import io
import os

import pytest

from blocks.errors import ChecksumMismatch, ObjectExists
from blocks.store import BackupStore
from tasks.stream import compress_into_store, open_compressed_writer, open_decompressed_reader, verify_object


@pytest.fixture
def store(tmp_path):
    return BackupStore.from_url(f"file://{tmp_path}/store").get_client()


def test_round_trip_checks_size_and_sha(store):
    data = os.urandom(2_000_000) + b"x" * 6_000_000
    result = compress_into_store(store, "backups/s/p.zst", io.BytesIO(data))
    stored = store.get_bytes("backups/s/p.zst")
    assert result.size == len(stored) < len(data)
    assert result.sha256 == hashlib.sha256(stored).hexdigest()
    assert result.raw_size == len(data)
    with open_decompressed_reader(store, "backups/s/p.zst", sha256=result.sha256, size=result.size) as src:
        assert hashlib.sha256(src.read()).digest() == hashlib.sha256(data).digest()


def test_flipped_byte_is_detected(store, tmp_path):
    result = compress_into_store(store, "backups/s/p.zst", io.BytesIO(os.urandom(100_000)))
    path = tmp_path / "store/backups/s/p.zst"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumMismatch, match="sha256"):
        verify_object(store, "backups/s/p.zst", sha256=result.sha256, size=result.size)


def test_failed_write_leaves_nothing(store):
    with pytest.raises(RuntimeError, match="dump died"):
        with open_compressed_writer(store, "backups/s/p.zst") as out:
            out.write(b"partial data" * 1000)
            raise RuntimeError("dump died")
    assert store.list() == []
    assert store.abort_incomplete_uploads() == 0


def test_existing_object_is_never_overwritten(store):
    store.put_bytes("backups/s/manifest.json", b"one")
    with pytest.raises(ObjectExists):
        store.put_bytes("backups/s/manifest.json", b"two")
    assert store.get_bytes("backups/s/manifest.json") == b"one"
