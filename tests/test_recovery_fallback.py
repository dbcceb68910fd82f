"""`disaster-recovery`'s fallback when the download its restore follows fails, end to end: real PostgreSQL,
SeaweedFS S3 reached through a TCP proxy that cuts the connection, and the session's Prefect API.

Phase 1 restores a database beside while its part still downloads (tasks/pg_load.py). If that download fails
or starts over, the restore raises StagingRestarted, its side database is dropped, and the flow restores
again from the download's final result: the finished file after a retry, or the download's own error. A
following restore that fails on a corrupt part's bytes before the download's check reports that check.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import zstandard
from pydantic import SecretStr

import flows.disaster_recovery
import tasks.pg_load
from blocks.errors import ChecksumMismatch
from blocks.postgres import PostgresConnection
from blocks.store import BackupStore
from flows.backup import backup
from flows.disaster_recovery import disaster_recovery
from tasks.manifest import Manifest, Part, manifest_key
from tasks.pg_checksums import collect_checksums
from tasks.recovery import read_journal, read_journals
from tasks.store import stage_part
from tests.faults import FaultyProxy

pytestmark = pytest.mark.e2e
DB = "shop"


def _s3_store(s3: Any, prefix: str, endpoint: str | None = None) -> BackupStore:
    return BackupStore(backend="s3", bucket=s3.bucket, prefix=prefix, endpoint_url=endpoint or s3.endpoint_url,
                       region=s3.region, access_key_id=SecretStr(s3.access_key),
                       secret_access_key=SecretStr(s3.secret_key))


@pytest.fixture
def production(fresh_pg: Any, s3: Any) -> dict[str, Any]:
    """A cluster whose database ``shop`` is backed up to S3 and then damaged. Its dump is a few MiB that
    zstd cannot shrink much, in several tables: the restore that follows the download has blocks to load."""
    pg = PostgresConnection.from_url(fresh_pg.url)
    with pg.connect(autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {DB}")
    with pg.connect(DB, autocommit=True) as c:
        c.execute("""
            CREATE TABLE orders (id bigserial PRIMARY KEY, customer text, total numeric(10,2), note text);
            INSERT INTO orders (customer, total, note)
                SELECT 'c' || g, g / 4.0, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text)
                FROM generate_series(1, 150000) g;
            CREATE INDEX orders_customer ON orders (customer);
            CREATE TABLE customers (id int PRIMARY KEY, email text UNIQUE);
            INSERT INTO customers SELECT g, 'c' || g || '@example.org' FROM generate_series(1, 20000) g;
            CREATE TABLE events AS SELECT g AS id, md5(random()::text) AS what FROM generate_series(1, 60000) g;
            CREATE TABLE app_meta (version text);
            INSERT INTO app_meta VALUES ('v1');
        """)
    good = _checksums(pg)
    prefix = f"fallback-{uuid.uuid4().hex[:8]}"
    direct = _s3_store(s3, prefix)
    set_id = backup(store=direct, postgres=pg, databases=[DB], include_globals=False, retries=0).set_id
    with pg.connect(DB, autocommit=True) as c:
        c.execute("UPDATE app_meta SET version = 'v2'")
        c.execute("DELETE FROM orders WHERE id % 3 = 0")
    return {"pg": pg, "good": good, "set_id": set_id, "prefix": prefix, "direct": direct}


def _part(s: dict[str, Any]) -> Part:
    """The set's database part (not held by the fixture: its object key would count as a secret there)."""
    return Manifest.from_bytes(s["direct"].get_client().get_bytes(manifest_key(s["set_id"]))).part("postgres")


def _checksums(pg: PostgresConnection, database: str = DB) -> list[Any]:
    with pg.connect(database) as c:
        return collect_checksums(c)


def _databases(pg: PostgresConnection) -> list[str]:
    with pg.connect() as c:
        return sorted(r[0] for r in c.execute("SELECT datname FROM pg_database WHERE NOT datistemplate"))


def _fingerprint(pg: PostgresConnection) -> dict[str, Any]:
    return {name: _checksums(pg, name) for name in _databases(pg)}


def _run_records(flow_run_id: Any) -> tuple[list[str], list[Any], str]:
    """The run's log messages, its task runs and its recovery-report artifact, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        [report] = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=["recovery-report"])))
    return [log.message for log in logs], task_runs, str(report.data)


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    """The run's staging directory (the flow makes its own temporary directory in it, removed at the end)."""
    path = tmp_path / "staging"
    path.mkdir()
    return path


@pytest.fixture
def quick_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The download's shipped retries (2), one second apart instead of ten."""
    monkeypatch.setattr(flows.disaster_recovery, "stage_part", stage_part.with_options(retry_delay_seconds=1))


def test_a_download_cut_mid_way_is_retried_and_the_restore_starts_again_from_the_finished_file(
    production: dict[str, Any], s3: Any, prefect_harness: None, quick_retry: None, staging: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = production
    part = _part(s)
    assert part.size > 4 * 2**20, part.size  # big enough to be cut mid-way
    proxy = FaultyProxy("127.0.0.1", s3.port).start()
    proxy.down_delay = 0.01  # a slow link: the download takes a second or two
    # Once, as the restore that follows the download loads its first data block: the store's connection drops,
    # and comes back half a second later, before the download's retry.
    cut_at: list[int] = []  # how many bytes of the dump were on disk then
    real_run = tasks.pg_load.DataLoaders._run

    def cut_at_the_first_load(self: Any, index: int, options: list[str], ids: list[int], feed: Any) -> None:
        if options[0] == "--section=data" and not cut_at:
            cut_at.append(self.progress.written)
            proxy.go_down(0.5)
        real_run(self, index, options, ids, feed)

    monkeypatch.setattr(tasks.pg_load.DataLoaders, "_run", cut_at_the_first_load)
    try:
        store = _s3_store(s3, s["prefix"], endpoint=f"http://127.0.0.1:{proxy.port}")
        state = disaster_recovery(store=store, backup_id=s["set_id"], postgres=s["pg"], confirm=True,
                                  staging_dir=str(staging), return_state=True)
        resets = proxy.resets
    finally:
        proxy.stop()

    assert state.is_completed(), state.result(raise_on_failure=False)
    assert len(cut_at) == 1 and 0 < cut_at[0] < part.raw_size // 2 and resets >= 1, (cut_at, resets)  # mid-way
    result = state.result()
    assert _checksums(s["pg"]) == s["good"]  # every table as backed up
    kept = result.kept[f"postgres:{DB}"]
    assert _databases(s["pg"]) == sorted(["postgres", DB, kept])  # no side database left, the damaged one kept
    assert list(staging.iterdir()) == []  # no staged file left
    journal = read_journal(s["direct"].get_client(), result.recovery_id)
    assert journal.phase == "recovered" and not journal.error

    logs, task_runs, report = _run_records(state.state_details.flow_run_id)
    assert "DONE: every target holds the backup set" in report
    # The download failed once and its retry went through; the restore that followed it gave up and ran again
    # from the finished file.
    [stage] = [t for t in task_runs if t.name.startswith("stage-postgres-")]
    assert stage.state.is_completed() and stage.run_count == 2, (stage.state, stage.run_count)
    restores = sorted((t for t in task_runs if t.name.startswith("restore-database-")), key=lambda t: t.start_time)
    assert [t.state.type.value for t in restores] == ["FAILED", "COMPLETED"]
    assert "StagingRestarted" in str(restores[0].state.message), restores[0].state.message
    fallback = [m for m in logs if f"restoring '{DB}' again once the download has been checked" in m]
    assert len(fallback) == 1 and "failed" in fallback[0], logs
    staged = [m for m in logs if m.startswith(f"staged {part.key}")]
    assert len(staged) == 1 and "sha256 verified" in staged[0]


@pytest.mark.parametrize("damage", ["manifest-sha256", "flipped-byte", "rows-changed"])
def test_a_download_whose_checksum_never_matches_fails_and_leaves_production_as_it_was(
    damage: str, production: dict[str, Any], s3: Any, prefect_harness: None, quick_retry: None, staging: Path,
) -> None:
    s = production
    client = s["direct"].get_client()
    part = _part(s)
    store = s["direct"]
    if damage == "manifest-sha256":
        # The manifest's sha256 is of other bytes: the stored part reads back whole, and the restore follows the
        # download to its end before the mismatch is known.
        key = manifest_key(s["set_id"])
        manifest = Manifest.from_bytes(client.get_bytes(key))
        manifest.part("postgres").sha256 = "0" * 64
        client.put_bytes(key, manifest.to_bytes(), overwrite=True)
    elif damage == "flipped-byte":
        # One bit of the stored part flipped, 40 % in: zstd, or the sha256 at the end, finds it.
        data = bytearray(client.get_bytes(part.key))
        data[len(data) * 4 // 10] ^= 0x10
        client.put_bytes(part.key, bytes(data), overwrite=True)
    else:
        # The stored part is a valid zstd stream of a dump whose customers rows were changed near the start:
        # one row is cut in two, which pg_restore refuses while the rest of the part still downloads (through
        # a slow link), long before the part's size and sha256 are found not to match the manifest.
        dump = zstandard.ZstdDecompressor().decompressobj().decompress(client.get_bytes(part.key))
        row = b"\x00\x11\x00\x00\x005\tc5@example.org\n"  # pg_dump -Z0 writes each row as a chunk: its length, the row
        assert dump.count(row) == 1
        cut = dump.replace(row, row.replace(b"\t", b"\n"))
        client.put_bytes(part.key, zstandard.ZstdCompressor().compress(cut), overwrite=True)
        proxy = FaultyProxy("127.0.0.1", s3.port).start()
        proxy.down_delay = 0.01
        store = _s3_store(s3, s["prefix"], endpoint=f"http://127.0.0.1:{proxy.port}")
    before = _fingerprint(s["pg"])

    try:
        state = disaster_recovery(store=store, backup_id=s["set_id"], postgres=s["pg"], confirm=True,
                                  staging_dir=str(staging), return_state=True)
    finally:
        if damage == "rows-changed":
            proxy.stop()

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ChecksumMismatch) and part.key in str(error), repr(error)
    assert _fingerprint(s["pg"]) == before  # production untouched, and no side database left
    assert list(staging.iterdir()) == []
    journal = read_journals(client)[-1]
    assert journal.phase == "prepare failed" and part.key in (journal.error or ""), journal.error
    assert {t.kind: t.state for t in journal.targets} == {"postgres": "untouched"}

    logs, task_runs, report = _run_records(state.state_details.flow_run_id)
    assert "FAILED while preparing: production was not changed" in report
    [stage] = [t for t in task_runs if t.name.startswith("stage-postgres-")]
    assert stage.state.is_failed() and stage.run_count == 1  # a checksum mismatch is not retried
    [restore] = [t for t in task_runs if t.name.startswith("restore-database-")]
    if damage == "rows-changed":  # pg_restore refused the cut row first; the run reports the part's check
        assert "missing data for column" in str(restore.state.message), restore.state.message
    elif damage == "manifest-sha256":  # the restore followed the download to its end, then gave up
        assert "StagingRestarted" in str(restore.state.message), restore.state.message
        assert any(f"restoring '{DB}' again once the download has been checked" in m for m in logs), logs
