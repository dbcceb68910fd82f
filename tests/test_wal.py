"""Pure WAL logic (names, LSNs, timelines, chains, recovery settings, retention) and the WAL commands'
configuration and store path against a local store: no server, no Prefect."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from blocks.backends import LocalStore
from blocks.errors import ConfigurationError
from deployments.wal import (
    EXIT_ABORT,
    EXIT_FAILED,
    WalCommandError,
    check_cluster,
    fetch_file,
    load_config,
    open_store,
    push_file,
    read_env_file,
)
from deployments.wal import main as wal_main
from tasks.wal import (
    BaseBackupRef,
    RecoveryTarget,
    archive_priority,
    backups_before,
    format_lsn,
    label_start,
    name_of_key,
    newest_timeline,
    on_path,
    parse_backup_label,
    parse_history,
    parse_lsn,
    parse_recovery_log,
    parse_wal_name,
    plan_chain,
    plan_pitr_retention,
    recovery_settings,
    restore_command_for,
    segment_name,
    segment_of_lsn,
    timeline_path,
    wal_key,
)

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
T0 = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)


# --------------------------------------------------------------------------------------- names and LSNs


def test_lsn_round_trip_and_segments():
    assert parse_lsn("0/3000028") == 0x3000028
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"
    assert segment_of_lsn(parse_lsn("0/3000028")) == 3
    assert segment_name(1, 3) == "000000010000000000000003"
    # 256 segments of 16 MiB per "log": segment 256 is log 1, seg 0
    assert segment_name(2, 256) == "000000020000000100000000"
    assert segment_name(1, 5, 64 * MiB) == "000000010000000000000005"
    assert segment_name(1, 64, 64 * MiB) == "000000010000000100000000"
    with pytest.raises(ConfigurationError, match="not an LSN"):
        parse_lsn("3000028")
    with pytest.raises(ConfigurationError, match="power of two"):
        segment_name(1, 1, 3 * MiB)


def test_wal_names_are_classified_and_keyed_by_timeline():
    seg = parse_wal_name("000000020000000100000003")
    assert (seg.kind, seg.timeline, seg.segno()) == ("segment", 2, 256 + 3)
    assert parse_wal_name("00000003.history").kind == "history"
    backup = parse_wal_name("000000010000000000000002.00000028.backup")
    assert (backup.kind, backup.segno()) == ("backup", 2)
    assert parse_wal_name("000000010000000000000005.partial").kind == "partial"
    for bad in ("RECOVERYXLOG", "pg_wal/000000010000000000000001", "00000001000000000000000g", ""):
        with pytest.raises(ConfigurationError, match="not a WAL file name"):
            parse_wal_name(bad)
    assert wal_key("000000020000000100000003") == "wal/00000002/000000020000000100000003.zst"
    assert wal_key("00000003.history") == "wal/00000003/00000003.history.zst"
    partial = wal_key("000000010000000000000005.partial", "ab" * 32)
    assert partial == "wal/00000001/000000010000000000000005.partial.abababababababab.zst"
    with pytest.raises(ConfigurationError, match="sha256"):
        wal_key("000000010000000000000005.partial")
    for name in ("000000020000000100000003", "00000003.history", "000000010000000000000005.partial"):
        assert name_of_key(wal_key(name, "ab" * 32)) == name
    assert name_of_key("wal/cluster.json") is None
    assert name_of_key("wal/restore-points/x.json") is None


def test_archive_order_puts_history_files_first():
    names = ["000000020000000000000005", "00000002.history", "000000010000000000000004"]
    assert sorted(names, key=archive_priority) == ["00000002.history", "000000010000000000000004",
                                                   "000000020000000000000005"]


# ------------------------------------------------------------------------------------------- timelines

HISTORY_3 = "1\t0/5000060\tno recovery target specified\n\n2\t0/70000A0\tbefore 2026-11-22 02:00:00+00\n"


def test_history_files_give_the_path_of_a_timeline():
    history = parse_history(HISTORY_3)
    assert [(h.parent, format_lsn(h.switch_lsn)) for h in history] == [(1, "0/5000060"), (2, "0/70000A0")]
    spans = timeline_path(3, history)
    assert [(s.timeline, s.begin, s.end) for s in spans] == [
        (1, 0, 0x5000060), (2, 0x5000060, 0x70000A0), (3, 0x70000A0, None)]
    assert on_path(spans, 1, parse_lsn("0/4000000"))
    assert not on_path(spans, 1, parse_lsn("0/6000000"))  # timeline 1 after the switch: another branch
    assert on_path(spans, 3, parse_lsn("9/0"))
    assert newest_timeline(1, [2, 3, 5]) == 3  # PostgreSQL probes 2, 3, 4: stops at the first missing
    assert newest_timeline(4, [2, 3]) == 4
    with pytest.raises(ConfigurationError):
        parse_history("x\t0/1\n")


def test_chain_follows_timeline_switches_and_names_the_first_gap():
    spans = timeline_path(2, parse_history("1\t0/5000060\tx\n"))
    start = parse_lsn("0/2000028")
    archived = {segment_name(1, n) for n in range(2, 6)} | {segment_name(2, n) for n in range(5, 9)}
    chain = plan_chain(spans, start, archived)
    assert (chain.first, chain.last, chain.segments, chain.missing) == (
        "000000010000000000000002", "000000020000000000000008", 7, None)
    # segment 5 holds the switch: read from timeline 2, so timeline 1's copy may be absent
    assert plan_chain(spans, start, archived - {segment_name(1, 5)}).missing is None
    broken = plan_chain(spans, start, archived - {segment_name(2, 6)})
    assert (broken.missing, broken.after_gap) == ("000000020000000000000006", 2)
    # the end of the archive is not a gap; an LSN target beyond it is
    assert plan_chain(spans, start, archived - {segment_name(2, 8)}).missing is None
    short = plan_chain(spans, start, archived, stop_lsn=parse_lsn("0/A000000"))
    assert short.missing == "000000020000000000000009"
    assert plan_chain(spans, start, archived, stop_lsn=parse_lsn("0/7000000")).missing is None


# ------------------------------------------------------------------------------------ recovery settings


def test_recovery_targets_and_settings():
    command = "/opt/r/bin/runbooks wal-fetch --config /etc/r.env %f %p"
    assert recovery_settings(RecoveryTarget(), restore_command=command) == {
        "restore_command": command, "recovery_target_timeline": "latest"}
    at = RecoveryTarget("time", time=T0)
    assert recovery_settings(at, restore_command=command, timeline="current") == {
        "restore_command": command, "recovery_target_timeline": "current",
        "recovery_target_time": "2026-11-22 02:00:00+00:00", "recovery_target_inclusive": "on",
        "recovery_target_action": "promote"}
    lsn = recovery_settings(RecoveryTarget("lsn", lsn=0x3000060, inclusive=False), restore_command=command,
                            action="pause", timeline="1")
    assert (lsn["recovery_target_lsn"], lsn["recovery_target_inclusive"], lsn["recovery_target_action"]) == (
        "0/3000060", "off", "pause")
    assert recovery_settings(RecoveryTarget("name", name="before-migration"),
                             restore_command=command)["recovery_target_name"] == "before-migration"
    with pytest.raises(ConfigurationError, match="needs target_time"):
        RecoveryTarget("time")
    with pytest.raises(ConfigurationError, match="target_lsn given"):
        RecoveryTarget("time", time=T0, lsn=1)
    with pytest.raises(ConfigurationError, match="time zone"):
        RecoveryTarget("time", time=datetime(2026, 1, 1))
    with pytest.raises(ConfigurationError, match="timeline"):
        recovery_settings(at, restore_command=command, timeline="newest")


def test_restore_command_is_derived_from_the_archive_command():
    assert restore_command_for("/opt/r/bin/runbooks wal-push --config /etc/r.env %p") == [
        "/opt/r/bin/runbooks", "wal-fetch", "--config", "/etc/r.env", "%f", "%p"]
    assert restore_command_for("runbooks wal-push %p") == ["runbooks", "wal-fetch", "%f", "%p"]
    for other in ("cp %p /backup/wal/%f", "runbooks wal-push %p; echo %p", ""):
        with pytest.raises(ConfigurationError, match="give restore_command"):
            restore_command_for(other)


SERVER_LOG = """\
2026-11-22 02:00:01.001 UTC [10] LOG:  starting point-in-time recovery to 2026-11-22 02:00:00+00
2026-11-22 02:00:01.200 UTC [10] LOG:  restored log file "000000010000000000000003" from archive
2026-11-22 02:00:01.300 UTC [10] LOG:  consistent recovery state reached at 0/3000100
2026-11-22 02:00:01.400 UTC [10] LOG:  recovery stopping before commit of transaction 745, time 2026-11-22 02:00:03.5+00
2026-11-22 02:00:01.401 UTC [10] LOG:  redo done at 0/4000A10 system usage: CPU: user: 0.00 s
2026-11-22 02:00:01.402 UTC [10] LOG:  last completed transaction was at log time 2026-11-22 01:59:58.1+00
2026-11-22 02:00:01.500 UTC [10] LOG:  selected new timeline ID: 2
2026-11-22 02:00:01.600 UTC [10] LOG:  archive recovery complete
2026-11-22 02:00:01.700 UTC [9] LOG:  database system is ready to accept connections
"""


def test_recovery_log_says_where_recovery_stopped():
    log = parse_recovery_log(SERVER_LOG)
    assert log.stopped_at.startswith("before commit of transaction 745")
    assert log.stop_time == "2026-11-22 02:00:03.5+00"
    assert (log.redo_done_lsn, log.new_timeline, log.complete, log.ready, log.fatal) == (
        "0/4000A10", 2, True, True, [])
    failed = parse_recovery_log(
        'LOG:  recovery stopping after WAL location (LSN) "0/5000060"\n'
        "wal-fetch: 000000010000000000000004 is not in the archive\n"
        "FATAL:  recovery ended before configured recovery target was reached\n")
    assert failed.stop_lsn == "0/5000060"
    assert failed.fatal == ["recovery ended before configured recovery target was reached"]
    assert failed.restore_failures == ["000000010000000000000004 is not in the archive"]


def test_backup_label_gives_start_checkpoint_and_timeline():
    label = parse_backup_label(
        "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\n"
        "BACKUP METHOD: streamed\nSTART TIMELINE: 1\n")
    assert label_start(label) == (0x2000028, 0x2000060, 1)
    with pytest.raises(ConfigurationError, match="backup_label"):
        label_start({})


# ---------------------------------------------------------------------------------- choosing and retention


def _backup(set_id: str, start_seg: int, hours: float, timeline: int = 1) -> BaseBackupRef:
    return BaseBackupRef(set_id=set_id, timeline=timeline, start_lsn=start_seg * 16 * MiB + 0x28,
                         stop_lsn=start_seg * 16 * MiB + 0x100, stop_time=T0 + timedelta(hours=hours))


def test_the_newest_backup_that_ended_before_the_target_is_chosen():
    backups = [_backup("a", 2, 0), _backup("b", 10, 24), _backup("c", 20, 48)]
    pick = lambda target, known=None: [b.set_id for b in backups_before(backups, target, known)]  # noqa: E731
    assert pick(RecoveryTarget()) == ["c", "b", "a"]
    assert pick(RecoveryTarget("time", time=T0 + timedelta(hours=30))) == ["b", "a"]
    assert pick(RecoveryTarget("time", time=T0 - timedelta(hours=1))) == []
    assert pick(RecoveryTarget("lsn", lsn=15 * 16 * MiB)) == ["b", "a"]
    assert pick(RecoveryTarget("name", name="x"), known=11 * 16 * MiB) == ["b", "a"]
    assert pick(RecoveryTarget("name", name="x")) == ["c", "b", "a"]


def test_retention_keeps_the_window_and_the_wal_kept_backups_need():
    backups = [_backup("a", 2, 0), _backup("b", 10, 24), _backup("c", 20, 48), _backup("d", 30, 72)]
    archived = [segment_name(1, n) for n in range(1, 40)] + [
        "00000002.history", "000000010000000000000002.00000028.backup",
        "000000010000000000000011.partial", segment_name(2, 12)]
    plan = plan_pitr_retention(backups, archived, keep_last=2, now=T0 + timedelta(hours=80))
    assert (plan.keep, plan.expire) == (["c", "d"], ["a", "b"])
    assert plan.oldest_needed == segment_name(1, 20)
    assert segment_name(1, 19) in plan.delete_wal and segment_name(1, 20) not in plan.delete_wal
    assert "00000002.history" not in plan.delete_wal
    assert "000000010000000000000011.partial" in plan.delete_wal and segment_name(2, 12) in plan.delete_wal
    # a 40-hour window starting at hour 40: c and d ended inside it, b is the newest before it
    window = plan_pitr_retention(backups, archived, keep_last=1, keep_within=timedelta(hours=40),
                                 now=T0 + timedelta(hours=80))
    assert window.keep == ["b", "c", "d"] and window.expire == ["a"]
    assert window.oldest_needed == segment_name(1, 10)
    assert plan_pitr_retention([], archived, now=T0).delete_wal == []  # a backup may be running
    with pytest.raises(ConfigurationError, match="at least 1"):
        plan_pitr_retention(backups, archived, keep_last=0, now=T0)


# -------------------------------------------------------------------------------------- configuration


def _write_config(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_config_file_wins_over_the_environment_and_is_never_world_readable(tmp_path):
    env = {"RUNBOOKS_WAL_STORE": "file:///from/env", "AWS_ACCESS_KEY_ID": "env-key", "HOME": "/x"}
    assert load_config(None, env).store_url == "file:///from/env"
    config_file = _write_config(tmp_path / "wal.env", (
        "# comment\nexport RUNBOOKS_WAL_STORE='s3://bucket/prefix?endpoint_url=http://127.0.0.1:9'\n"
        'AWS_SECRET_ACCESS_KEY="s3cr3t"\nRUNBOOKS_WAL_CONCURRENCY=8\nRUNBOOKS_WAL_ASYNC=off\n'))
    config = load_config(config_file, env)
    assert config.store_url.startswith("s3://bucket/prefix")
    assert (config.access_key_id, config.secret_access_key, config.concurrency, config.async_mode) == (
        "env-key", "s3cr3t", 8, False)
    assert "s3cr3t" not in repr(config) and "env-key" not in repr(config)
    assert config.fingerprint("/a") != config.fingerprint("/b")
    assert config.fingerprint("/a") != config.replace(secret_access_key="other").fingerprint("/a")
    with pytest.raises(WalCommandError, match="chmod 600"):
        read_env_file(_write_config(tmp_path / "open.env", "RUNBOOKS_WAL_STORE=x\n", 0o644))
    with pytest.raises(WalCommandError, match="RUNBOOKS_WAL_STORE is not set"):
        load_config(None, {})
    with pytest.raises(WalCommandError, match="outside"):
        load_config(None, {"RUNBOOKS_WAL_STORE": "file:///x", "RUNBOOKS_WAL_CONCURRENCY": "0"})
    with pytest.raises(WalCommandError, match="line 1"):
        read_env_file(_write_config(tmp_path / "bad.env", "just words\n"))


def test_wal_store_url_keeps_the_wal_defaults_and_names_the_variable(tmp_path):
    config = load_config(None, {"RUNBOOKS_WAL_STORE": f"file://{tmp_path}"})
    assert open_store(config).root == tmp_path
    s3 = open_store(config.replace(store_url="s3://b/p?endpoint_url=http://127.0.0.1:9", concurrency=6))
    assert (s3.bucket, s3.prefix, s3.part_size, s3.max_concurrency) == ("b", "p", 64 * 1024 * 1024, 6)
    assert s3.description == "s3://b/p at http://127.0.0.1:9"
    for url, message in (("relative/dir", "absolute path"), ("s3://k:pw@b/p", "AWS_\\* variables"),
                         ("s3://b/p?endpoint=x", "unknown S3 store option"), ("ftp://h/x", "use file:///dir"),
                         ("s3://b/p?part_size_mib=big", "RUNBOOKS_WAL_STORE")):
        with pytest.raises(WalCommandError, match=message):
            open_store(config.replace(store_url=url))


def test_usage_errors_exit_non_zero_with_a_message(capsys):
    assert wal_main(["wal-push"]) == EXIT_FAILED
    assert "one argument" in capsys.readouterr().err
    assert wal_main(["wal-fetch", "000000010000000000000001"]) == EXIT_FAILED
    assert wal_main(["wal-push", "--bogus", "x"]) == EXIT_FAILED
    assert "unknown option" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the store path, locally


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def _segment(tmp_path: Path, name: str, fill: bytes) -> str:
    path = tmp_path / "pg_wal" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(fill * (MiB // len(fill)))
    return str(path)


def test_push_is_idempotent_and_refuses_different_content(tmp_path, store):
    path = _segment(tmp_path, "000000010000000000000007", b"first copy ")
    assert push_file(store, path) == "stored"
    stored = store.get_bytes(wal_key("000000010000000000000007"))
    assert len(stored) < MiB // 10  # compressed
    assert push_file(store, path) == "identical copy already archived"
    Path(path).write_bytes(b"other bytes" * (MiB // 11))
    with pytest.raises(WalCommandError, match="DIFFERENT 000000010000000000000007.*nothing was overwritten"):
        push_file(store, path)
    assert store.get_bytes(wal_key("000000010000000000000007")) == stored


def test_partial_segments_of_different_branches_are_both_kept(tmp_path, store):
    one = _segment(tmp_path, "000000010000000000000005.partial", b"branch one ")
    push_file(store, one)
    Path(one).write_bytes(b"branch two " * (MiB // 11))
    push_file(store, one)
    assert len([o for o in store.list("wal/") if ".partial." in o.key]) == 2


def test_fetch_round_trip_missing_and_corrupt(tmp_path, store):
    path = _segment(tmp_path, "000000010000000000000003", b"replay me ")
    push_file(store, path)
    dest = tmp_path / "RECOVERYXLOG"
    assert fetch_file(store, "000000010000000000000003", str(dest))
    assert dest.read_bytes() == Path(path).read_bytes()
    assert not fetch_file(store, "000000010000000000000004", str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()
    key_path = store.root / wal_key("000000010000000000000003")
    raw = bytearray(key_path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    key_path.write_bytes(bytes(raw))
    with pytest.raises(WalCommandError, match="corrupt") as caught:
        fetch_file(store, "000000010000000000000003", str(tmp_path / "again"))
    assert caught.value.code == EXIT_ABORT
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("again")] == []


def test_archive_belongs_to_one_cluster(store):
    check_cluster(store, {"system_identifier": "1", "pg_version": "15"}, create=False)
    assert not store.exists("wal/cluster.json")
    check_cluster(store, {"system_identifier": "1", "pg_version": "15"}, create=True)
    check_cluster(store, {"system_identifier": "1", "pg_version": "15"}, create=False)
    with pytest.raises(WalCommandError, match="belongs to another cluster") as caught:
        check_cluster(store, {"system_identifier": "2", "pg_version": "15"}, create=True)
    assert caught.value.code == EXIT_ABORT


# ------------------------------------------------------------------------------------------- start-up


def test_wal_commands_never_import_prefect_or_pydantic():
    """The archive_command path: the CLI module, the command module and a full run of a usage error."""
    code = (
        "import sys; from deployments.cli import main; "
        "rc = main(['wal-push']); "
        "import deployments.wal, tasks.wal; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'pydantic', 'boto3', 'botocore'));"
        "print(rc, bad)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if not k.startswith("RUNBOOKS_")}, check=False)
    assert done.stdout.strip() == "1 []", done.stderr


def test_the_daemon_process_reports_a_bad_configuration_in_one_line(tmp_path: Path) -> None:
    """As the commands start it (``python -m deployments.wal wal-daemon``): a WalCommandError raised in
    deployments.wal_daemon is the one main() catches, so the daemon's log gets a message, not a traceback."""
    spool = tmp_path / "spool"
    spool.mkdir()
    done = subprocess.run([sys.executable, "-m", "deployments.wal", "wal-daemon", "--spool", str(spool), "--pgdata",
                           str(tmp_path)], capture_output=True, text=True, cwd=ROOT, check=False,
                          env={k: v for k, v in os.environ.items() if not k.startswith("RUNBOOKS_")})
    assert done.returncode == EXIT_FAILED
    assert done.stderr.startswith("wal-daemon: RUNBOOKS_WAL_STORE is not set"), done.stderr
    assert "Traceback" not in done.stderr
