"""`runbooks wal-push` / `wal-fetch` run by real PostgreSQL clusters (as the postgres OS user) against
SeaweedFS S3: archiving under pgbench, idempotent and refused pushes, fast misses, the archiver keeping up."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from tasks.process import pg_tool
from tasks.scratch import ScratchPostgres
from tasks.wal import wal_key

pytestmark = pytest.mark.e2e


def sql(pg: ScratchPostgres, query: str, *args: object) -> list[tuple]:
    with psycopg.connect(pg.url, autocommit=True) as conn:
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description else []


def pgbench(pg: ScratchPostgres, *args: str, background: bool = False) -> subprocess.Popen | None:
    argv = [pg_tool("pgbench"), "-h", pg.host, "-p", str(pg.port), "-U", pg.user, *args, "postgres"]
    env = {**os.environ, "PGPASSWORD": pg.password}
    if background:
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return None


def switch_and_wait_archived(pg: ScratchPostgres, timeout: float = 60) -> str:
    """Close the current segment and wait until PostgreSQL reports it archived; returns its name."""
    segment = sql(pg, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last, failed = sql(pg, "SELECT last_archived_wal, failed_count FROM pg_stat_archiver")[0]
        if last is not None and last >= segment:
            return segment
        time.sleep(0.05)
    raise AssertionError(f"{segment} not archived within {timeout}s (failed_count {failed}); log:\n"
                         f"{pg.log_file.read_text()[-3000:]}")


def as_postgres(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", ScratchPostgres.OS_USER, "--", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False)


def ready_backlog(pg: ScratchPostgres) -> int:
    return sum(1 for n in os.listdir(pg.data_dir / "pg_wal" / "archive_status") if n.endswith(".ready"))


@pytest.fixture
def archiving_pg(wal_archive):
    archive = wal_archive()
    with ScratchPostgres(password="archiving-pw", settings=archive.settings()) as server:
        yield server, archive


def test_cluster_archives_every_segment_and_wal_fetch_gives_it_back(archiving_pg):
    pg, archive = archiving_pg
    pgbench(pg, "-i", "-s", "4", "-q")
    last = switch_and_wait_archived(pg)
    names = archive.wal_names()
    segments = sorted(n for n in names if len(n) == 24)
    assert segments[0] == "000000010000000000000001" and segments[-1] == last
    assert len(segments) == int(last[-8:], 16)  # 1 .. last, no gap
    assert sql(pg, "SELECT failed_count FROM pg_stat_archiver")[0][0] == 0
    stored = {o.key: o.size for o in archive.client.list("wal/00000001/")}
    assert stored[wal_key(last)] < 16 * 2**20 / 2  # compressed
    assert archive.client.exists("wal/cluster.json")

    # The daemon runs as postgres in a private spool; fetching gives back the exact bytes of pg_wal.
    spool = pg.data_dir / "pg_wal" / "runbooks"
    assert spool.stat().st_mode & 0o777 == 0o700 and spool.stat().st_uid == pg.data_dir.stat().st_uid
    fetched = pg.data_dir / "pg_wal" / "FETCHED"
    done = as_postgres([archive.python, "-m", "deployments.cli", "wal-fetch", "--config", archive.config_file,
                        last, "pg_wal/FETCHED"], pg.data_dir)
    assert done.returncode == 0, done.stderr
    assert fetched.read_bytes() == (pg.data_dir / "pg_wal" / last).read_bytes()
    fetched.unlink()


def test_pushing_the_same_name_again_succeeds_only_with_identical_content(archiving_pg):
    pg, archive = archiving_pg
    sql(pg, "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
    segment = switch_and_wait_archived(pg)
    original = archive.client.get_bytes(wal_key(segment))
    elsewhere = pg.base / "elsewhere"  # pytest's tmp_path is private to root; the cluster's base is postgres'
    elsewhere.mkdir()
    shutil.chown(elsewhere, ScratchPostgres.OS_USER, ScratchPostgres.OS_USER)
    copy = elsewhere / segment
    copy.write_bytes((pg.data_dir / "pg_wal" / segment).read_bytes())
    push = [archive.python, "-m", "deployments.cli", "wal-push", "--config", archive.config_file, str(copy)]
    same = as_postgres(push, pg.data_dir)
    assert same.returncode == 0, same.stderr

    changed = bytearray(copy.read_bytes())
    changed[4096] ^= 0xFF
    copy.write_bytes(bytes(changed))
    refused = as_postgres(push, pg.data_dir)
    assert refused.returncode == 1
    assert f"DIFFERENT {segment}" in refused.stderr and "nothing was overwritten" in refused.stderr
    assert archive.client.get_bytes(wal_key(segment)) == original


def test_wal_fetch_of_a_missing_file_fails_fast_and_a_broken_store_aborts_recovery(archiving_pg, wal_archive):
    pg, archive = archiving_pg
    switch_and_wait_archived(pg)
    fetch = [archive.python, "-m", "deployments.cli", "wal-fetch", "--config", archive.config_file]
    timings = []
    for name in ("00000009.history", "0000000100000000000000FF", "00000002.history"):
        started = time.monotonic()
        done = as_postgres([*fetch, name, "pg_wal/RECOVERYHISTORY"], pg.data_dir)
        timings.append(time.monotonic() - started)
        assert done.returncode == 1 and "not in the archive" in done.stderr
    assert not (pg.data_dir / "pg_wal" / "RECOVERYHISTORY").exists()
    # The first call starts the daemon (boto3, an S3 client); then a miss is one round trip.
    assert timings[0] < 10 and max(timings[1:]) < 1.5, timings

    broken = wal_archive(RUNBOOKS_WAL_FETCH_RETRY_SECONDS="1", RUNBOOKS_WAL_ASYNC="off")
    broken_conf = Path(broken.config_file)
    broken_conf.write_text(broken_conf.read_text().replace(archive.store_url.split("?")[1].split("&")[0],
                                                           "endpoint_url=http://127.0.0.1:9"))
    done = as_postgres([archive.python, "-m", "deployments.cli", "wal-fetch", "--config", broken.config_file,
                        "000000010000000000000001", "pg_wal/RECOVERYXLOG"], pg.data_dir)
    assert done.returncode == 255, done.stderr  # > 125: PostgreSQL aborts recovery instead of promoting


def test_archiver_keeps_up_with_60_seconds_of_pgbench(archiving_pg):
    """The acceptance run: the .ready backlog must not grow while pgbench writes for a minute."""
    pg, archive = archiving_pg
    # Commits without waiting for their own flush: many times the WAL volume of plain pgbench on this disk.
    sql(pg, "ALTER SYSTEM SET synchronous_commit = off")
    sql(pg, "SELECT pg_reload_conf()")
    pgbench(pg, "-i", "-s", "10", "-q")
    # TPC-B writes a few hundred bytes of WAL per transaction; a second script adds bulk rows so the
    # minute produces dozens of segments (several MB/s), as a busy primary would.
    sql(pg, "CREATE TABLE bulk (id bigserial, payload text)")
    script = pg.base / "bulk.sql"
    script.write_text("INSERT INTO bulk (payload) SELECT md5(random()::text) || repeat('x', 400) "
                      "FROM generate_series(1, 50);\n")
    switch_and_wait_archived(pg)
    load = pgbench(pg, "-c", "4", "-j", "2", "-T", "60", "-n", "-b", "tpcb-like@5", "-f", f"{script}@1",
                   background=True)
    assert load is not None
    samples: list[int] = []
    started = time.monotonic()
    while load.poll() is None:
        samples.append(ready_backlog(pg))
        time.sleep(1)
    assert load.returncode == 0, load.stderr.read() if load.stderr else ""
    elapsed = time.monotonic() - started
    last = switch_and_wait_archived(pg, timeout=30)
    archived, failed = sql(pg, "SELECT archived_count, failed_count FROM pg_stat_archiver")[0]
    first_half, second_half = samples[: len(samples) // 2], samples[len(samples) // 2:]
    print(f"pgbench {elapsed:.0f}s: {archived} files archived up to {last}, backlog samples {samples}")
    assert failed == 0
    assert archived >= 20, "pgbench wrote too little WAL for the test to mean anything"
    assert max(samples) <= 4, samples
    assert statistics.mean(second_half) <= statistics.mean(first_half) + 1, samples
    assert ready_backlog(pg) == 0
