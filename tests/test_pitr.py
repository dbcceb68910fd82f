"""`pitr-base-backup` and `pitr-restore` end to end: a real cluster archiving to SeaweedFS under pgbench,
marker rows at t1, t2, t3 with WAL switches between, restores to a time, a restore point, an LSN and the
end of the archive; a second restore on the old timeline after a promoted one archived a new timeline;
a missing segment; retention. Restored clusters are started as the postgres OS user."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from blocks.errors import PreflightFailed, RestoreFailed, WalMissing
from blocks.postgres import PostgresConnection
from tasks.pitr.restore_points import create_restore_point
from tasks.pitr.retention import expire_pitr_backups
from tasks.pitr.tar import TarStream, check_backup_manifest
from tasks.scratch import ScratchPostgres, free_port
from tasks.wal import wal_key
from tests.test_wal_commands import pgbench, sql, switch_and_wait_archived

pytestmark = pytest.mark.e2e


@dataclass
class Source:
    pg: ScratchPostgres
    archive: object
    store: object
    set_id: str
    t12: datetime  # between the m1 and m2 markers
    t23: datetime  # between m2 and m3
    lsn_after_m1: str
    restore_point: str


def markers(url: str) -> set[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {row[0] for row in conn.execute("SELECT label FROM markers")}


def insert_marker(pg: ScratchPostgres, label: str) -> None:
    sql(pg, "INSERT INTO markers (label) SELECT %s || '-' || g FROM generate_series(1, 3) g", label)


@pytest.fixture(scope="module")
def restores():
    """Every restored cluster is stopped and removed at the end of the module."""
    made: list[tuple[str, int]] = []

    def place() -> tuple[str, int]:
        base = Path(tempfile.mkdtemp(prefix="pitr-restore-", dir="/tmp"))
        base.rmdir()  # the flow wants a new directory
        made.append((str(base), free_port()))
        return made[-1]

    yield place
    for base, port in made:
        if Path(base, "data").exists():
            ScratchPostgres.adopt(base, port=port).stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def source(wal_archive, prefect_harness):
    from flows.pitr import pitr_base_backup

    archive = wal_archive()
    with ScratchPostgres(password="pitr-source-pw", fast=True, settings=archive.settings()) as pg:
        conn = PostgresConnection.from_url(pg.url)
        pgbench(pg, "-i", "-s", "2", "-q")
        sql(pg, "CREATE TABLE markers (label text, at timestamptz DEFAULT clock_timestamp())")
        store = archive.block()
        backup = pitr_base_backup(postgres=conn, store=store)
        load = pgbench(pg, "-c", "2", "-T", "120", "-n", background=True)
        try:
            insert_marker(pg, "m1")
            lsn_after_m1 = sql(pg, "SELECT pg_current_wal_insert_lsn()::text")[0][0]
            record = create_restore_point.fn(conn, "before-m2", store)
            sql(pg, "SELECT pg_switch_wal()")
            time.sleep(0.3)
            t12 = sql(pg, "SELECT clock_timestamp()")[0][0]
            time.sleep(0.3)
            insert_marker(pg, "m2")
            sql(pg, "SELECT pg_switch_wal()")
            time.sleep(0.3)
            t23 = sql(pg, "SELECT clock_timestamp()")[0][0]
            time.sleep(0.3)
            insert_marker(pg, "m3")
        finally:
            load.terminate()
            load.wait()
        switch_and_wait_archived(pg)
        assert markers(pg.url) == {f"m{i}-{g}" for i in (1, 2, 3) for g in (1, 2, 3)}
        yield Source(pg, archive, store, backup.set_id, t12, t23, lsn_after_m1, record.name)


def m(*numbers: int) -> set[str]:
    return {f"m{i}-{g}" for i in numbers for g in (1, 2, 3)}


def restored_url(source: Source, port: int) -> str:
    return f"postgresql://postgres:{source.pg.password}@127.0.0.1:{port}/postgres"


def test_base_backup_is_complete_verified_and_consistent_with_the_archive(source):
    from tasks.pitr.planning import base_backups

    [manifest] = [b for b in base_backups(source.archive.client) if b.set_id == source.set_id]
    info = manifest.pitr
    assert info.timeline == 1 and info.files_verified and info.files > 900
    assert info.system_identifier == sql(source.pg, "SELECT system_identifier::text FROM pg_control_system()")[0][0]
    assert "pitr-base" in manifest.tags
    names = source.archive.wal_names()
    assert info.start_wal in names and info.stop_wal in names
    assert any(n.endswith(".backup") for n in names)  # PostgreSQL's backup history file, archived too


def test_pg_basebackup_and_the_replication_protocol_give_the_same_backup(source):
    """The default reads BASE_BACKUP itself (its tar gets backup_manifest appended, as pg_basebackup's does);
    with SHA256 checksums, verify compares every file's content with what the server hashed, and the tar's
    files with the manifest's list."""
    import io
    import tarfile

    from tasks.manifest import BACKUP_MANIFEST, new_set_id
    from tasks.pitr.base_backup import take_base_backup, verify_base_backup
    from tasks.pitr.planning import base_backups
    from tasks.store import discard_incomplete_set
    from tasks.stream import open_decompressed_reader

    [default] = [b for b in base_backups(source.archive.client) if b.set_id == source.set_id]
    tar_part, manifest_part = default.part("pgbase", "base.tar"), default.part("pgbase", BACKUP_MANIFEST)
    assert tar_part.tool == "BASE_BACKUP (replication protocol) --manifest-checksums=CRC32C"
    assert verify_base_backup.fn(source.store, tar_part, manifest_part).compared == "size"
    conn = PostgresConnection.from_url(source.pg.url)
    set_ids = [new_set_id(), new_set_id()]  # parts only, never a manifest: discarded below
    try:
        members = []
        for set_id, use_pg_basebackup in zip(set_ids, (False, True), strict=True):
            taken = take_base_backup.fn(conn, source.store, set_id, manifest_checksums="SHA256",
                                        use_pg_basebackup=use_pg_basebackup)
            assert taken.parts[0].tool.startswith("pg_basebackup" if use_pg_basebackup else "BASE_BACKUP")
            assert verify_base_backup.fn(source.store, *taken.parts).compared == "size and sha256"
            part = taken.parts[0]
            with open_decompressed_reader(source.archive.client, part.key, sha256=part.sha256, size=part.size) as src:
                names = [m.name for m in tarfile.open(fileobj=io.BytesIO(src.read()), mode="r:")]
            members.append((names[0], names[-1]))
        assert members == [("backup_label", BACKUP_MANIFEST)] * 2  # the server's order, the manifest last
    finally:
        for set_id in set_ids:
            discard_incomplete_set.fn(source.store, set_id)


def test_a_base_backup_cut_off_or_with_tablespaces_stores_nothing(fresh_pg, faulty_proxy, tmp_path):
    import threading

    from blocks.errors import BaseBackupFailed
    from blocks.store import BackupStore
    from tasks.manifest import new_set_id
    from tasks.pitr.base_backup import take_base_backup

    store = BackupStore.from_url(f"file://{tmp_path / 'store'}")
    conn = PostgresConnection.from_url(fresh_pg.url)
    proxy = faulty_proxy("127.0.0.1", fresh_pg.port)

    def cut() -> None:  # the link drops 4 MiB into the ~25 MiB of an empty cluster
        while proxy.bytes_down < 4 << 20:
            time.sleep(0.001)
        proxy.go_down()

    threading.Thread(target=cut, daemon=True).start()
    with pytest.raises(BaseBackupFailed, match="base backup of .* failed"):
        take_base_backup.fn(conn.model_copy(update={"port": proxy.port}), store, new_set_id())
    location = fresh_pg.base / "tablespace"  # postgres must reach it
    location.mkdir()
    shutil.chown(location, "postgres", "postgres")
    sql(fresh_pg, f"CREATE TABLESPACE elsewhere LOCATION '{location}'")
    for use_pg_basebackup in (False, True):
        with pytest.raises(BaseBackupFailed, match="tablespace"):
            take_base_backup.fn(conn, store, new_set_id(), use_pg_basebackup=use_pg_basebackup)
    assert store.get_client().list() == [] and store.get_client().abort_incomplete_uploads() == 0


def test_restore_to_latest_has_all_three_markers(source, restores):
    from flows.pitr import pitr_restore

    target_dir, port = restores()
    result = pitr_restore(store=source.store, target_dir=target_dir, port=port, keep_archiving=False)
    assert result.stopped_at is None and result.state == "promoted"
    assert markers(restored_url(source, port)) == m(1, 2, 3)


def test_an_explicit_restore_command_is_an_argv_postgres_runs_quoted_and_shell_syntax_is_refused(source, restores):
    """The argv template reaches postgresql.auto.conf as shell-quoted words of wal-fetch; a real recovery runs
    through it. Shell syntax in any word is refused before the target directory is made."""
    import shlex

    from blocks.errors import ConfigurationError
    from flows.pitr import pitr_restore

    argv = shlex.split(source.archive.restore_command)
    target_dir, port = restores()
    for word in ("%p; touch /tmp/pwned", "$(id)"):
        with pytest.raises(ConfigurationError, match="no shell syntax"):
            pitr_restore(store=source.store, target_dir=target_dir, port=port, keep_archiving=False,
                         restore_command=[*argv[:-1], word])
    assert not Path(target_dir).exists() and not Path("/tmp/pwned").exists()
    result = pitr_restore(store=source.store, target_dir=target_dir, port=port, keep_archiving=False,
                          restore_command=argv)
    assert result.state == "promoted" and markers(restored_url(source, port)) == m(1, 2, 3)
    conf = Path(target_dir, "data", "postgresql.auto.conf").read_text()
    assert f"restore_command = '{shlex.join(argv)}'" in conf


def test_restore_to_a_time_between_t1_and_t2_has_exactly_the_t1_markers(source, restores):
    from flows.pitr import pitr_restore

    before = {o.key: hashlib.sha256(source.archive.client.get_bytes(o.key)).hexdigest()
              for o in source.archive.client.list("wal/00000001/")}
    target_dir, port = restores()
    result = pitr_restore(store=source.store, target_dir=target_dir, port=port, target="time",
                          target_time=source.t12)
    assert result.set_id == source.set_id and result.state == "promoted"
    assert result.stopped_at.startswith("before commit") and result.timeline == 2
    url = restored_url(source, port)
    assert markers(url) == m(1)

    # The promoted cluster archives its new timeline (and keeps it apart); timeline 1 stays as it was.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO markers (label) VALUES ('m4-on-timeline-2')")
        segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
    deadline = time.monotonic() + 60
    while not source.archive.client.exists(wal_key(segment)):
        assert time.monotonic() < deadline, f"{segment} of timeline 2 was not archived"
        time.sleep(0.2)
    assert segment.startswith("00000002")
    assert source.archive.client.exists("wal/00000002/00000002.history.zst")
    after = {o.key: hashlib.sha256(source.archive.client.get_bytes(o.key)).hexdigest()
             for o in source.archive.client.list("wal/00000001/") if o.key in before}
    assert after == before

    # A second restore, on the old timeline, still reaches t2 < t < t3 there ...
    target_dir, port = restores()
    old = pitr_restore(store=source.store, target_dir=target_dir, port=port, target="time",
                       target_time=source.t23, timeline="current", keep_archiving=False)
    assert markers(restored_url(source, port)) == m(1, 2)
    assert old.timeline == 3  # the archive already holds timeline 2's history: a new timeline id is picked
    # ... and `latest` follows the newest timeline: timeline 2's own write is there, m2 and m3 are not.
    target_dir, port = restores()
    pitr_restore(store=source.store, target_dir=target_dir, port=port, keep_archiving=False)
    assert markers(restored_url(source, port)) == m(1) | {"m4-on-timeline-2"}


def test_restore_to_a_named_restore_point(source, restores):
    from flows.pitr import pitr_restore

    target_dir, port = restores()
    result = pitr_restore(store=source.store, target_dir=target_dir, port=port, target="name",
                          target_name=source.restore_point, keep_archiving=False)
    assert '"before-m2"' in result.stopped_at
    assert markers(restored_url(source, port)) == m(1)


def test_restore_to_an_lsn(source, restores):
    from flows.pitr import pitr_restore

    target_dir, port = restores()
    result = pitr_restore(store=source.store, target_dir=target_dir, port=port, target="lsn",
                          target_lsn=source.lsn_after_m1, timeline="1", keep_archiving=False)
    assert source.lsn_after_m1 in result.stopped_at
    assert markers(restored_url(source, port)) == m(1)


def test_a_missing_segment_fails_the_restore_naming_it(source, restores):
    from flows.pitr import pitr_restore
    from tasks.pitr.planning import base_backups

    client = source.archive.client
    [info] = [b.pitr for b in base_backups(client) if b.set_id == source.set_id]
    victim = f"{info.stop_wal[:16]}{int(info.stop_wal[16:], 16) + 2:08X}"  # between the markers
    key = wal_key(victim)
    saved = client.get_bytes(key)
    client.delete(key)
    try:
        target_dir, port = restores()
        with pytest.raises(WalMissing, match=f"WAL segment {victim} is missing"):
            pitr_restore(store=source.store, target_dir=target_dir, port=port, timeline="1", keep_archiving=False)
        assert not Path(target_dir).exists()  # refused before anything was written
        # A time target may lie before the gap, so that restore runs; it fails at the gap, naming it.
        target_dir, port = restores()
        # How PostgreSQL reports the stop depends on timing (the target not reached, or the server still in
        # recovery when it gives up); either way the error names the missing segment.
        with pytest.raises(WalMissing, match=f"WAL segment {victim} is missing"):
            pitr_restore(store=source.store, target_dir=target_dir, port=port, timeline="1", keep_archiving=False,
                         target="time", target_time=datetime.now(source.t12.tzinfo) + timedelta(hours=1))
    finally:
        client.put_bytes(key, saved)


def test_a_target_after_the_end_of_the_archive_is_reported_not_reached(source, restores):
    from flows.pitr import pitr_restore

    target_dir, port = restores()
    with pytest.raises(RestoreFailed, match="recovery ended before configured recovery target was reached"):
        pitr_restore(store=source.store, target_dir=target_dir, port=port, target="time",
                     target_time=datetime.now(source.t12.tzinfo) + timedelta(hours=1), timeline="1",
                     keep_archiving=False)


def test_preflight_refuses_a_server_that_does_not_archive(fresh_pg, wal_archive, prefect_harness):
    from flows.pitr import pitr_base_backup

    archive = wal_archive()
    with pytest.raises(PreflightFailed) as refused:
        pitr_base_backup(postgres=PostgresConnection.from_url(fresh_pg.url), store=archive.block())
    message = str(refused.value)
    assert "archive_mode is off" in message and "archive_command" in message and "Nothing was backed up" in message
    assert archive.client.list() == []


def test_tar_stream_follows_members_and_checks_backup_manifest():
    import io
    import json
    import tarfile

    buffer = io.BytesIO()
    files = {"PG_VERSION": b"15\n", "base/1/1259": b"x" * 10_000, "global/pg_control": b"\1" * 8192}
    body = {"PostgreSQL-Backup-Manifest-Version": 1, "Files": [
        {"Path": p, "Size": len(d), "Checksum-Algorithm": "SHA256", "Checksum": hashlib.sha256(d).hexdigest()}
        for p, d in files.items()]}
    text = json.dumps(body)[:-1] + ',\n"Manifest-Checksum": "'
    text = text.encode()
    manifest = text + hashlib.sha256(text[: text.rfind(b'"Manifest-Checksum"')]).hexdigest().encode() + b'"}\n'
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in {**files, "backup_manifest": manifest}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    stream = TarStream(capture=("backup_manifest",), hash_members=True)
    for start in range(0, len(raw), 777):  # odd chunk sizes cross every header and padding boundary
        stream.feed(raw[start:start + 777])
    assert stream.ended and stream.captured["backup_manifest"] == manifest
    assert check_backup_manifest(manifest, stream.files) == []
    tampered = dict(stream.files)
    tampered["base/1/1259"] = (10_000, "0" * 64)
    del tampered["PG_VERSION"]
    tampered["extra"] = (1, None)
    assert check_backup_manifest(manifest, tampered) == [
        "PG_VERSION: in backup_manifest, not in the backup", "base/1/1259: sha256 differs from backup_manifest",
        "extra: in the backup, not in backup_manifest"]


def test_retention_expires_old_base_backups_and_only_the_wal_they_needed(source, prefect_harness):
    from flows.pitr import pitr_base_backup
    from tasks.pitr.planning import base_backups

    client = source.archive.client
    second = pitr_base_backup(postgres=PostgresConnection.from_url(source.pg.url), store=source.store, verify=False)
    dry = expire_pitr_backups.fn(source.store, keep_last=1, dry_run=True)
    assert dry.expired == [source.set_id] and dry.kept == [second.set_id]
    assert {b.set_id for b in base_backups(client)} == {source.set_id, second.set_id}
    done = expire_pitr_backups.fn(source.store, keep_last=1)
    [kept] = base_backups(client)
    assert kept.set_id == second.set_id and done.oldest_needed == kept.pitr.start_wal and done.wal_deleted > 0
    assert client.list(f"backups/{source.set_id}/") == []
    names = source.archive.wal_names()
    assert min(n for n in names if len(n) == 24 and n.startswith("00000001")) >= done.oldest_needed
    assert "00000002.history" in names
