"""Security: parameters that cannot become commands or paths outside their place, private files at rest.

Pure checks with plain asserts; the store and staging against real directories (with umask 000); the
restore_command PostgreSQL runs is exercised end to end by tests/test_pitr.py (a real recovery through it).
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from blocks.errors import ConfigurationError, StoreError
from tasks.manifest import Manifest, Part, build_manifest, part_key, part_key_problem
from tasks.wal import RecoveryTarget, restore_command_argv, restore_command_for, restore_command_line

SET_ID = "20261122T020000Z-3fa9c1"

# Every word here reaches a command line: each must be refused, whatever part of the template it is in.
SHELL_WORDS = ["x;touch /tmp/pwned", "$(id)", "`id`", "a|b", "a&b", "a>b", "a<b", "a b", "'a'", '"a"', "a\nb",
               "a\\b", "${HOME}", "*", "a?", "~root", "!1", "a#b", "(a)", "{a,b}", "a\0b"]


# ------------------------------------------------------------------------------- restore_command


def test_restore_command_template_accepts_only_wal_fetch_with_f_and_p():
    assert restore_command_argv(["/opt/r/bin/runbooks", "wal-fetch", "--config", "/etc/r.env", "%f", "%p"]) == [
        "/opt/r/bin/runbooks", "wal-fetch", "--config", "/etc/r.env", "%f", "%p"]
    assert restore_command_argv("/usr/bin/python3 -m deployments.cli wal-fetch --config=/e.env %f %p")[-2:] == [
        "%f", "%p"]
    refused = [
        ["/bin/sh", "-c", "wal-fetch", "%f", "%p"],                        # another program
        ["runbooks", "wal-fetch", "%p", "%f"],                             # placeholders swapped
        ["runbooks", "wal-fetch", "%f", "%p", "%r"],                       # %r is not allowed
        ["runbooks", "wal-fetch", "--config", "%r", "%f", "%p"],           # placeholder inside the options
        ["runbooks", "wal-fetch", "--spool", "/tmp", "%f", "%p"],          # an option wal-fetch does not take
        ["runbooks", "wal-push", "%p"],                                    # not wal-fetch
        ["runbooks", "wal-fetch", "wal-fetch", "%f", "%p"],                # twice
        ["python3", "-c", "deployments.cli", "wal-fetch", "%f", "%p"],     # python running code, not the module
        [],
    ]
    for argv in refused:
        with pytest.raises(ConfigurationError, match="nothing was changed"):
            restore_command_argv(argv)


@pytest.mark.parametrize("word", SHELL_WORDS)
def test_shell_syntax_in_any_restore_command_word_is_refused(word: str):
    for argv in (["runbooks", "wal-fetch", "--config", word, "%f", "%p"], [word, "wal-fetch", "%f", "%p"],
                 ["runbooks", "wal-fetch", "%f", word]):
        with pytest.raises(ConfigurationError, match="no shell syntax|cannot be parsed"):
            restore_command_argv(argv)
    if not set("'\"\\") & set(word):  # (quotes and backslashes are consumed by shlex when given a string)
        with pytest.raises(ConfigurationError):
            restore_command_argv(f"runbooks wal-fetch --config {word} %f %p")


def test_the_value_postgres_runs_through_sh_is_the_quoted_argv():
    line = restore_command_line(["/opt/r/bin/runbooks", "wal-fetch", "--config", "/etc/r.env", "%f", "%p"])
    assert line == "/opt/r/bin/runbooks wal-fetch --config /etc/r.env %f %p"
    # /bin/sh splits it back into exactly the argv (PostgreSQL substitutes %f and %p with safe names first).
    substituted = line.replace("%f", "000000010000000000000003").replace("%p", "pg_wal/RECOVERYXLOG")
    echoed = subprocess.run(["/bin/sh", "-c", f'for a in {substituted}; do printf "%s\\n" "$a"; done'],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert echoed == ["/opt/r/bin/runbooks", "wal-fetch", "--config", "/etc/r.env", "000000010000000000000003",
                      "pg_wal/RECOVERYXLOG"]


def test_a_tampered_archive_command_in_a_manifest_gives_no_restore_command():
    assert restore_command_for("/opt/r/bin/runbooks wal-push --config /etc/r.env %p") == [
        "/opt/r/bin/runbooks", "wal-fetch", "--config", "/etc/r.env", "%f", "%p"]
    for archive_command in ("runbooks wal-push %p; curl evil", "sh -c 'runbooks wal-push %p'",
                            "runbooks wal-push --config '/tmp/a b' %p", "/bin/sh wal-push %p"):
        with pytest.raises(ConfigurationError):
            restore_command_for(archive_command)


def test_a_restore_point_name_cannot_break_out_of_postgresql_auto_conf():
    with pytest.raises(ConfigurationError, match="control characters"):
        RecoveryTarget("name", name="x'\nrestore_command = 'id")
    from tasks.pitr.recovery_config import _conf_line

    with pytest.raises(ConfigurationError, match="control character"):
        _conf_line("recovery_target_name", "a\nb")
    assert _conf_line("recovery_target_name", "it's") == "recovery_target_name = 'it''s'"


def test_os_user_must_be_a_plain_existing_account():
    from tasks.pitr.extract import check_os_user

    assert check_os_user("root") == "root"
    for bad in ("root; id", "-u", "a b", "../x", "Root", ""):
        with pytest.raises(ConfigurationError, match="POSIX user name"):
            check_os_user(bad)
    with pytest.raises(ConfigurationError, match="does not exist"):
        check_os_user("no-such-user-xyz")


def test_pitr_restore_refuses_a_shell_restore_command_before_anything_changes(tmp_path, prefect_harness):
    from blocks.store import BackupStore
    from flows.pitr import pitr_restore

    target = tmp_path / "restored"
    store = BackupStore.from_url(f"file://{tmp_path / 'empty-store'}")
    for command in (["runbooks", "wal-fetch", "%f", "%p;id"], ["sh", "-c", "id", "wal-fetch", "%f", "%p"]):
        with pytest.raises(ConfigurationError, match="restore_command"):
            pitr_restore(store=store, target_dir=str(target), port=1, restore_command=command)
    with pytest.raises(ConfigurationError, match="POSIX user name"):
        pitr_restore(store=store, target_dir=str(target), port=1, os_user="postgres -c id")
    assert not target.exists() and not (tmp_path / "empty-store").exists()


# ------------------------------------------------------------------------------- manifest part keys


def _part(key: str, data: bytes = b"x") -> Part:
    return Part(kind="files", name="f", key=key, size=len(data), raw_size=len(data),
                sha256=hashlib.sha256(data).hexdigest(), tool="test")


def _manifest_bytes(keys: list[str], set_id: str = SET_ID) -> bytes:
    now = datetime.now(UTC)
    good = build_manifest(set_id, [_part(part_key(set_id, "files", "f"))], started_at=now, completed_at=now,
                          tags=[], source={}, runbooks_version="test")
    tampered = good.model_copy(update={"parts": [_part(k) for k in keys]})
    return tampered.to_bytes()


def test_part_keys_are_checked_when_a_manifest_is_read():
    prefix = f"backups/{SET_ID}/"
    assert part_key_problem(SET_ID, f"{prefix}files/f.tar.zst") is None
    bad = [f"{prefix}../../../etc/passwd", f"{prefix}files/../../x", "/etc/passwd", f"/{prefix}x",
           f"{prefix}a\0b", "backups/20261122T020000Z-000000/files/f.tar.zst", f"{prefix}", f"{prefix}a//b",
           f"{prefix}./a", f"{prefix}a\\..\\b", f"{prefix}a\nb", "files/f.tar.zst"]
    for key in bad:
        assert part_key_problem(SET_ID, key), key
        with pytest.raises(StoreError, match="refusing the whole manifest"):
            Manifest.from_bytes(_manifest_bytes([f"{prefix}files/ok.tar.zst", key]), where="test")
    with pytest.raises(StoreError, match="not a backup set id"):
        Manifest.from_bytes(_manifest_bytes([f"{prefix}x"], set_id="../../x"))


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _tree_state(root: Path) -> dict[str, tuple[int, bytes | None]]:
    return {str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_tampered_manifest_with_dotdot_keys_stages_nothing_and_touches_nothing_outside(tmp_path, monkeypatch):
    """The read fails before any file is opened; stage_part given such a part directly refuses it the same way."""
    import builtins

    from blocks.backends import LocalStore
    from blocks.store import BackupStore
    from tasks import store as store_tasks

    root = tmp_path / "store"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    client = LocalStore(root)
    payload = b"payload"
    import zstandard

    compressed = zstandard.ZstdCompressor().compress(payload)
    client.put_bytes(f"backups/{SET_ID}/files/f.tar.zst", compressed)
    key = f"backups/{SET_ID}/../../../victim.txt.zst"
    client.put_bytes(f"backups/{SET_ID}/manifest.json", _manifest_bytes([key]))
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o700)
    before = _tree_state(tmp_path)

    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):  # noqa: ANN001, ANN202
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_os_open(path, *args, **kwargs):  # noqa: ANN001, ANN202
        opened.append(str(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    with pytest.raises(StoreError, match="refusing the whole manifest"):
        store_tasks.read_manifest(client, SET_ID)
    with pytest.raises(StoreError, match="outside|'\\.\\.' segment"):
        store_tasks.stage_part.fn(_part(key, compressed), BackupStore.from_url(f"file://{root}"), str(staging))
    monkeypatch.undo()
    # Only the manifest itself was read (LocalStore.open_read); no staging or victim path was opened.
    assert [p for p in opened if not p.endswith("manifest.json")] == []
    assert _tree_state(tmp_path) == before
    assert victim.read_bytes() == b"precious\n"


def test_staging_refuses_a_symlink_out_of_staging(tmp_path):
    from blocks.store import BackupStore
    from tasks.store import stage_part, staging_path

    staging = tmp_path / "staging"
    (staging / "backups").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (staging / "backups" / SET_ID).symlink_to(outside)
    with pytest.raises(StoreError, match="resolves outside the staging directory"):
        staging_path(str(staging), f"backups/{SET_ID}/files/f.tar.zst")
    with pytest.raises(StoreError, match="resolves outside"):
        stage_part.fn(_part(f"backups/{SET_ID}/files/f.tar.zst"), BackupStore.from_url(f"file://{tmp_path}/s"),
                      str(staging))
    assert list(outside.iterdir()) == []


# ------------------------------------------------------------------------------- private at rest


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_local_store_and_staging_are_private_whatever_the_umask(tmp_path, umask_000):
    import zstandard

    from blocks.store import BackupStore
    from tasks.store import stage_part

    store = BackupStore.from_url(f"file://{tmp_path}/store")
    client = store.get_client()
    data = os.urandom(100_000)
    compressed = zstandard.ZstdCompressor().compress(data)
    key = f"backups/{SET_ID}/postgres/app.dump.zst"
    client.put_bytes(key, compressed)
    with client.open_write(f"backups/{SET_ID}/redis/redis.rdb.zst") as out:
        out.write(compressed)
    created = [p for p in (tmp_path / "store").rglob("*")]
    assert created, "the store wrote nothing"
    for path in [tmp_path / "store", *created]:
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), (path, oct(_mode(path)))

    staging = tmp_path / "staging"
    staging.mkdir(mode=0o700)
    staged = stage_part.fn(Part(kind="postgres", name="app", key=key, size=len(compressed), raw_size=len(data),
                                sha256=hashlib.sha256(compressed).hexdigest(), tool="test"), store, str(staging))
    assert Path(staged.path).read_bytes() == data
    for path in staging.rglob("*"):
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), (path, oct(_mode(path)))


def test_wal_fetch_writes_the_segment_0600_whatever_the_umask(tmp_path, umask_000):
    import zstandard

    from blocks.backends import LocalStore
    from deployments.wal import fetch_file
    from tasks.wal import wal_key

    client = LocalStore(tmp_path / "archive")
    segment = os.urandom(64 * 1024)
    name = "000000010000000000000003"
    client.put_bytes(wal_key(name), zstandard.ZstdCompressor(write_checksum=True).compress(segment))
    dest = tmp_path / "pg_wal" / "RECOVERYXLOG"
    dest.parent.mkdir()
    assert fetch_file(client, name, str(dest))
    assert dest.read_bytes() == segment
    assert _mode(dest) == 0o600
    for path in (tmp_path / "archive").rglob("*"):
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), (path, oct(_mode(path)))


# ------------------------------------------------------------------------------- S3 server-side encryption


@pytest.fixture(scope="module")
def sse_s3() -> Iterator[object]:
    """SeaweedFS with SSE-S3 enabled (its KMS-less key derivation; SSE-KMS needs an external KMS)."""
    import secrets

    from deployments.sandbox import SeaweedS3

    with SeaweedS3(bucket="sse", sse_key=secrets.token_hex(32)) as server:
        yield server


def _s3_store(server, *, sse: str, kms_key_id: str | None = None, prefix: str = "p"):  # noqa: ANN001, ANN202
    from blocks.backends import make_s3_store

    return make_s3_store(bucket="sse", prefix=prefix, description=f"s3://sse/{prefix}",
                         endpoint_url=server.endpoint_url, region=server.region, access_key_id=server.access_key,
                         secret_access_key=server.secret_key, session_token=None, sse=sse, kms_key_id=kms_key_id,
                         storage_class=None, part_size=5 * 2**20, max_concurrency=2)


def _sent_headers(store) -> list[tuple[str, dict[str, str]]]:  # noqa: ANN001
    sent: list[tuple[str, dict[str, str]]] = []

    def record(request, **_kwargs):  # noqa: ANN001, ANN202
        sent.append((request.method + " " + request.url.split("?")[1 if "?" in request.url else 0][:40],
                     {k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()}))

    store.client.meta.events.register("before-send.s3", record)
    return sent


def _volume_bytes(server) -> bytes:  # noqa: ANN001
    return b"".join(p.read_bytes() for p in Path(server._tmp, "data").rglob("*.dat"))


def test_sse_s3_objects_are_encrypted_at_rest_in_seaweedfs_and_never_public(sse_s3):
    plain_marker, secret_marker = os.urandom(48), os.urandom(48)
    plain = _s3_store(sse_s3, sse="", prefix="plain")
    plain.put_bytes("marker", plain_marker * 4)
    store = _s3_store(sse_s3, sse="AES256")
    sent = _sent_headers(store)
    store.put_bytes("small", secret_marker * 4)
    big = secret_marker * (12 * 2**20 // len(secret_marker))  # multipart: create, 3 parts, complete
    with store.open_write("big") as out:
        out.write(big)
    assert store.get_bytes("small") == secret_marker * 4 and store.get_bytes("big") == big
    for key in ("p/small", "p/big"):
        assert store.client.head_object(Bucket="sse", Key=key)["ServerSideEncryption"] == "AES256"
        grants = store.client.get_object_acl(Bucket="sse", Key=key)["Grants"]
        assert [g["Permission"] for g in grants] == ["FULL_CONTROL"] and "URI" not in grants[0]["Grantee"]
    puts = [h for what, h in sent if what.startswith(("PUT", "POST")) and "partNumber" not in what
            and "uploadId" not in what]
    assert puts and all(h.get("x-amz-server-side-encryption") == "AES256" for h in puts)
    assert not any("x-amz-acl" in h or "x-amz-grant-read" in h for _, h in sent)
    # On SeaweedFS's disk: the plain object is there in clear, the encrypted ones are not.
    time.sleep(0.5)
    volumes = _volume_bytes(sse_s3)
    assert plain_marker in volumes
    assert secret_marker not in volumes


def test_sse_kms_sends_the_key_id_and_a_refusal_leaves_no_object(sse_s3):
    """SeaweedFS has no KMS here: the headers are sent with the key id, the refusal is a StoreError naming
    the object, and nothing is left behind (single put and multipart alike)."""
    store = _s3_store(sse_s3, sse="aws:kms", kms_key_id="arn:aws:kms:us-east-1:111122223333:key/runbooks-test",
                      prefix="kms")
    sent = _sent_headers(store)
    with pytest.raises(StoreError, match="upload of small"):
        store.put_bytes("small", b"x" * 100)
    with pytest.raises(StoreError, match="upload of big"), store.open_write("big") as out:
        out.write(os.urandom(6 * 2**20))
    # (upload_part carries no SSE header: the upload's settings come from CreateMultipartUpload)
    writes = [h for what, h in sent if what.startswith(("PUT", "POST")) and "uploadId" not in what]
    assert writes and all(h.get("x-amz-server-side-encryption") == "aws:kms" and
                          h.get("x-amz-server-side-encryption-aws-kms-key-id", "").endswith("key/runbooks-test")
                          for h in writes)
    assert store.list("") == []


# ------------------------------------------------------------------------------- the secret scan of e2e tests


def test_the_secret_scan_finds_what_fixtures_hold_and_where_it_leaked():
    from pydantic import SecretStr

    from blocks.postgres import PostgresConnection
    from tasks.scratch import ScratchPostgres
    from tests.conftest import find_leaks, fixture_secrets

    class Stack:  # a test's own dataclass-like holder, as tests/test_triggers.py has
        def __init__(self) -> None:
            self.token = "bridge-token-abcdefgh"
            self.access_key = "not-a-secret-key-id"
            self.key = "/tmp/ca/key.pem"  # a path to a key is not the key

    key_pem = ("-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
               "-----END PRIVATE KEY-----\n")
    found = fixture_secrets({
        "fresh_pg": ScratchPostgres(password="scratch-pw-12345"),
        "block": PostgresConnection(password=SecretStr("block-pw-67890"), sslrootcert="x", sslcert="c",
                                    sslkey=SecretStr(key_pem)),
        "stack": Stack(),
    })
    assert {"scratch-pw-12345", "block-pw-67890", "bridge-token-abcdefgh",
            "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg"} <= found
    assert not {"not-a-secret-key-id", "/tmp/ca/key.pem"} & found
    leaks = find_leaks(found, ["log runbooks: connected as postgres", "artifact x: password block-pw-67890"])
    assert leaks == ["blo... (14 chars) in 'artifact x: password <SECRET>'"]


# ------------------------------------------------------------------------------- backup parameters


def test_backup_parameters_that_reach_tools_and_files_are_checked():
    from tasks.validate import check_database_name, check_local_path, check_tag

    assert check_database_name('Sales "EU" Q\'1') == 'Sales "EU" Q\'1'
    assert check_local_path("paths", "/srv/media files") == "/srv/media files"
    assert check_tag("{{ labels.alertname }}") == "{{ labels.alertname }}"
    for bad in ("", "x" * 64, "é" * 32, "a\0b", "a\nb"):
        with pytest.raises(ConfigurationError, match="63 bytes"):
            check_database_name(bad)
    for bad in ("media", "../etc", "/srv/../etc", "/srv/a\0b", "/srv/a\nb", ""):
        with pytest.raises(ConfigurationError, match="paths"):
            check_local_path("paths", bad)
    for bad in ("", "x" * 101, "a\nb", "a\x1b[2Jb"):
        with pytest.raises(ConfigurationError, match="tag"):
            check_tag(bad)


def test_backup_refuses_bad_paths_and_tags_before_anything_is_written(tmp_path, prefect_harness):
    from blocks.store import BackupStore
    from flows.backup import backup

    store = BackupStore.from_url(f"file://{tmp_path / 'store'}")
    media = tmp_path / "media"
    media.mkdir()
    for kwargs, message in (({"paths": ["media"]}, "absolute path"), ({"paths": [str(media) + "/../.."]}, "'\\.\\.'"),
                            ({"paths": [str(media)], "tags": ["ok", "forged\nline"]}, "printable")):
        with pytest.raises(ConfigurationError, match=message):
            backup(store=store, retries=0, **kwargs)
    assert not (tmp_path / "store").exists()
