"""PITR benchmark (`make bench` runs it; alone: `python bench/pitr.py`).

Measures, with the baseline in the same run:

  1. archive_command latency per 16 MiB segment under a pgbench write load: the guides'
     `test ! -f DIR/%f && cp %p DIR/%f` into a local directory, `runbooks wal-push` into SeaweedFS S3
     (warm daemon: the default), and `runbooks wal-push` with RUNBOOKS_WAL_ASYNC=off (one process per
     segment, for reference). Each command runs under the same timing wrapper as PostgreSQL's archiver
     calls it; only segments archived while pgbench runs count.
  2. Base backup wall time of the bench dataset: `pg_basebackup -Ft` into a local directory against the
     base backup step of `pitr-base-backup` (pg_basebackup -> zstd -> S3), and the whole flow.
  3. PITR restore time of the bench dataset (`pitr-restore` to the end of the archive).

Prints a markdown report and writes it to docs/benchmarks-pitr.md. The machine is shared: every
measurement runs several rounds, and the report gives the median and the spread.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.dataset import DatasetSpec, generate  # noqa: E402
from tasks.manifest import human_size  # noqa: E402
from tasks.process import pg_tool  # noqa: E402

BUCKET = "bench-pitr"
OS_USER = "postgres"
_T0 = time.monotonic()

TIMED_ARCHIVE = """#!/bin/sh
# timed-archive LOG NAME COMMAND...: run COMMAND, append "NAME start_ns end_ns exit" to LOG
log=$1; name=$2; shift 2
start=$(date +%s%N)
"$@"
code=$?
end=$(date +%s%N)
echo "$name $start $end $code" >> "$log"
exit $code
"""
NOTES = """## Reading the numbers

- The WAL command PostgreSQL waits for imports neither Prefect nor boto3 (start-up table); under load its
  time is the daemon's upload of the segment (zstd, then one S3 PUT of a few MiB to SeaweedFS on the same
  two cores) plus a Python start, which the floor row prices. Uploads run ahead of PostgreSQL's requests
  when segments queue up, so the `.ready` backlog stays at 0-1 where one process per segment falls behind.
- The base backup baseline writes an uncompressed tar into the page cache. The runbook reads the same
  archive off the replication connection itself (no pg_basebackup process, no pipe), compresses it (zstd
  level 1, about 5:1 here) and uploads it; SeaweedFS, on the same two cores, spends about 10 ms of CPU per
  stored MiB taking it in. Both cores are busy the whole time: the ratio is bound by CPU, and the S3
  server's share of it would run elsewhere in a real deployment. The two variant rows price the choices
  the step makes (docs/pitr.md, "Base backup cost").
"""
BULK_SQL = "INSERT INTO bulk (payload) SELECT md5(random()::text) || repeat('x', 400) FROM generate_series(1, 50);\n"


def say(text: str) -> None:
    print(f"[{time.monotonic() - _T0:6.0f}s] {text}", flush=True)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class LatencyRun:
    variant: str
    latencies_ms: list[float]
    first_ms: float | None
    segments_per_s: float
    max_backlog: int
    failed: int
    load: str
    python_floor_ms: list[float] = field(default_factory=list)  # `python -c pass` during the same load


def _time_ms(argv: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return (time.perf_counter() - started) * 1000


@dataclass
class Timed:
    name: str
    seconds: list[float] = field(default_factory=list)
    note: str = ""

    def cell(self) -> str:
        if not self.seconds:
            return "-"
        med = statistics.median(self.seconds)
        spread = f" ({min(self.seconds):.1f}-{max(self.seconds):.1f})" if len(self.seconds) > 1 else ""
        return f"{med:.1f} s{spread}"


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work

    # -- helpers -----------------------------------------------------------------------------
    def pgbench(self, pg, *args: str, background: bool = False, database: str = "postgres"):  # noqa: ANN001, ANN201
        argv = [pg_tool("pgbench"), "-h", pg.host, "-p", str(pg.port), "-U", pg.user, *args, database]
        env = {**os.environ, "PGPASSWORD": pg.password}
        if background:
            return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pgbench {' '.join(args)}: {done.stderr[-500:]}")
        return None

    @staticmethod
    def sql(pg, query: str) -> list[tuple]:  # noqa: ANN001
        import psycopg

        with psycopg.connect(pg.url, autocommit=True) as conn:
            cur = conn.execute(query)
            return cur.fetchall() if cur.description else []

    def wait_archived(self, pg, timeout: float = 120) -> None:  # noqa: ANN001
        segment = self.sql(pg, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.sql(pg, "SELECT last_archived_wal FROM pg_stat_archiver")[0][0]
            if last is not None and last >= segment:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{segment} not archived within {timeout} s")

    def postgres_dir(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        shutil.chown(path, OS_USER, OS_USER)
        return path

    def wal_config(self, s3, prefix: str, **extra: str) -> Path:  # noqa: ANN001
        path = self.work / f"{prefix}.env"
        lines = {"RUNBOOKS_WAL_STORE": f"s3://{BUCKET}/{prefix}?endpoint_url={s3.endpoint_url}&region={s3.region}",
                 "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                 "RUNBOOKS_WAL_IDLE_EXIT": "30", **extra}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("".join(f"{k}={v}\n" for k, v in lines.items()))
        shutil.chown(path, OS_USER, OS_USER)
        return path

    # -- 1. archive_command latency ----------------------------------------------------------
    def latency_run(self, variant: str, command: str, log: Path, *, python: str | None = None,
                    rate: int | None = None) -> LatencyRun:
        """One fresh cluster archiving with ``command`` under pgbench; ``python``: also time a bare start
        of that interpreter every second during the load (the floor of any Python archive_command)."""
        import threading

        from tasks.scratch import ScratchPostgres

        log.unlink(missing_ok=True)
        log.touch()
        shutil.chown(log, OS_USER, OS_USER)
        timed = f"{self.work / 'timed-archive.sh'} {log} %f {command}"
        settings = {"wal_level": "replica", "archive_mode": "on", "archive_command": timed,
                    "synchronous_commit": "off", "max_wal_size": "1GB"}
        with ScratchPostgres(password=secrets.token_urlsafe(12), settings=settings,
                             base_dir=str(self.work)) as pg:
            self.pgbench(pg, "-i", "-s", "10", "-q")
            self.sql(pg, "CREATE TABLE bulk (id bigserial, payload text)")
            self.wait_archived(pg)
            first = _read_timings(log)
            first_ms = first[0][1] if first else None
            script = pg.base / "bulk.sql"
            script.write_text(BULK_SQL)
            load_before = load_average()
            started_ns = time.time_ns()
            if rate is None:  # as fast as it goes: both cores saturated
                mix = ["-c", "4", "-j", "2", "-b", "tpcb-like@5", "-f", f"{script}@1"]
            else:  # a fixed transaction rate: a busy server with some CPU to spare
                mix = ["-c", "2", "-j", "2", "-R", str(rate), "-b", "tpcb-like@1", "-f", f"{script}@1"]
            load = self.pgbench(pg, *mix, "-T", str(self.args.seconds), "-n", background=True)
            backlog = 0
            status = pg.data_dir / "pg_wal" / "archive_status"
            floor: list[float] = []
            probing = threading.Event()

            def probe() -> None:
                while not probing.wait(1.0):
                    floor.append(_time_ms([python, "-c", "pass"], pg.data_dir))

            prober = threading.Thread(target=probe, daemon=True) if python else None
            if prober:
                prober.start()
            while load.poll() is None:
                backlog = max(backlog, sum(1 for n in os.listdir(status) if n.endswith(".ready")))
                time.sleep(0.5)
            probing.set()
            if prober:
                prober.join()
            ended_ns = time.time_ns()
            self.wait_archived(pg)
            failed = self.sql(pg, "SELECT failed_count FROM pg_stat_archiver")[0][0]
        rows = [(name, ms) for name, ms, start in _read_timings(log, with_start=True)
                if started_ns <= start <= ended_ns and len(name) == 24]
        return LatencyRun(variant, [ms for _, ms in rows], first_ms, len(rows) / ((ended_ns - started_ns) / 1e9),
                          backlog, failed, f"{load_before} -> {load_average()}", floor)

    def startup(self, python: str, config: Path, s3) -> dict[str, list[float]]:  # noqa: ANN001
        """Start-up of the commands without pgbench: a bare interpreter, `wal-fetch` of a missing file
        against a warm daemon, and a cold one (``RUNBOOKS_WAL_ASYNC=off``, boto3 in the process)."""
        from tasks.scratch import ScratchPostgres

        cold = self.wal_config(s3, "startup-cold", RUNBOOKS_WAL_ASYNC="off")
        times: dict[str, list[float]] = {"bare": [], "warm": [], "cold": []}
        with ScratchPostgres(password=secrets.token_urlsafe(12), base_dir=str(self.work), fast=True) as pg:
            fetch = [python, "-m", "deployments.cli", "wal-fetch", "--config"]
            missing = ["000000010000000000000099", "pg_wal/RECOVERYXLOG"]
            for user_cmd in ([*fetch, str(config), *missing],):  # start the daemon first
                subprocess.run(["runuser", "-u", OS_USER, "--", *user_cmd], cwd=pg.data_dir, capture_output=True,
                               check=False)
            for _ in range(15):
                times["bare"].append(_time_ms(["runuser", "-u", OS_USER, "--", python, "-c", "pass"], pg.data_dir))
                times["warm"].append(_time_ms(["runuser", "-u", OS_USER, "--", *fetch, str(config), *missing],
                                              pg.data_dir))
            for _ in range(5):
                times["cold"].append(_time_ms(["runuser", "-u", OS_USER, "--", *fetch, str(cold), *missing],
                                              pg.data_dir))
        return times

    # -- 2 and 3. base backup and restore ----------------------------------------------------
    def baseline_basebackup(self, pg) -> float:  # noqa: ANN001
        target = self.work / "pg_basebackup-local"
        shutil.rmtree(target, ignore_errors=True)
        argv = [pg_tool("pg_basebackup"), "-h", pg.host, "-p", str(pg.port), "-U", pg.user, "-Ft", "-D",
                str(target), "--checkpoint=fast", "--no-password"]
        started = time.monotonic()
        done = subprocess.run(argv, env={**os.environ, "PGPASSWORD": pg.password}, capture_output=True, text=True,
                              check=False)
        seconds = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(f"pg_basebackup: {done.stderr[-500:]}")
        self.local_size = sum(p.stat().st_size for p in target.iterdir())
        shutil.rmtree(target, ignore_errors=True)
        return seconds


def cpu_snapshot(postmaster: int, weed: int) -> dict[str, float]:
    """CPU seconds so far: PostgreSQL's process tree, our reaped children (pg_basebackup), this process
    (zstd, sha256, boto3 threads), SeaweedFS, and the whole machine."""
    import resource

    from bench.measure import machine_busy, tree_cpu

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"postgres": tree_cpu(postmaster), "pg_basebackup": children.ru_utime + children.ru_stime,
            "runbooks": own.ru_utime + own.ru_stime, "seaweedfs": tree_cpu(weed), "machine": machine_busy()}


def cpu_cell(samples: list[dict[str, float]]) -> str:
    """Median CPU seconds per party over the rounds; "rest" is everything else the machine ran meanwhile."""
    if not samples:
        return "-"
    parties = ("postgres", "pg_basebackup", "runbooks", "seaweedfs")
    med = {p: statistics.median(s[p] for s in samples) for p in parties}
    rest = statistics.median(s["machine"] - sum(s[p] for p in parties) for s in samples)
    return " / ".join(f"{med[p]:.1f}" for p in parties) + f" / {rest:.1f}"


def _latency_rows(runs: dict[str, list[LatencyRun]], variants: dict[str, str]) -> list[str]:
    rows = []
    for name, results in runs.items():
        if not results:
            continue

        def stat(fn, results=results) -> str:  # noqa: ANN001
            values = [fn(r) for r in results if r.latencies_ms]
            if not values:
                return "-"
            spread = f" ({min(values):.0f}-{max(values):.0f})" if len(values) > 1 else ""
            return f"{statistics.median(values):.0f} ms{spread}"

        p50, p99 = stat(lambda r: percentile(r.latencies_ms, 50)), stat(lambda r: percentile(r.latencies_ms, 99))
        rows.append(f"| {name} | {sum(len(r.latencies_ms) for r in results)} | {p50} | {p99} "
                    f"| {stat(lambda r: max(r.latencies_ms))} | {stat(lambda r: r.first_ms or 0)} "
                    f"| {max(r.max_backlog for r in results)} | {sum(r.failed for r in results)} |")
    floor = [ms for r in runs[list(variants)[1]] for ms in r.python_floor_ms]
    if floor:
        rows.append(f"| (floor) `python -c pass`, same interpreter, once a second during the wal-push runs "
                    f"| {len(floor)} | {percentile(floor, 50):.0f} ms | {percentile(floor, 99):.0f} ms "
                    f"| {max(floor):.0f} ms | | | |")
    return rows


def _read_timings(log: Path, *, with_start: bool = False) -> list:
    rows = []
    for line in log.read_text().splitlines():
        name, start, end, code = line.split()
        if code == "0":
            ms = (int(end) - int(start)) / 1e6
            rows.append((name, ms, int(start)) if with_start else (name, ms))
    return rows


@contextmanager
def _quiet_prefect() -> Iterator[None]:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def run(args: argparse.Namespace) -> str:
    from blocks.postgres import PostgresConnection
    from blocks.store import BackupStore
    from deployments.sandbox import SeaweedS3
    from tasks.scratch import ScratchPostgres, free_port, interpreter_for

    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    work.chmod(0o755)
    bench = Bench(args, work)
    timed_script = work / "timed-archive.sh"
    timed_script.write_text(TIMED_ARCHIVE)
    timed_script.chmod(0o755)
    started_at = datetime.now(UTC)
    load_at_start = load_average()
    lines: list[str] = []
    with ExitStack() as stack:
        say("starting SeaweedFS (S3 on loopback)")
        s3 = stack.enter_context(SeaweedS3(bucket=BUCKET, base_dir=str(work)))
        python = interpreter_for(OS_USER, work)
        say(f"wal commands run as {OS_USER} with {python}")
        runbooks = f"{python} -m deployments.cli"

        if not args.only_base_backup:
            # 1. archive_command latency, the guide's cp next to wal-push, alternating, several rounds
            local_archive = bench.postgres_dir("guide-archive")
            variants = {
                "guide: `test ! -f DIR/%f && cp %p DIR/%f` (local dir)":
                    f"sh -c 'test ! -f {local_archive}/\"$1\" && cp \"$2\" {local_archive}/\"$1\"' sh %f %p",
                "`runbooks wal-push` -> SeaweedFS S3 (daemon, default)":
                    f"{runbooks} wal-push --config {{config}} %p",
                "`runbooks wal-push` -> SeaweedFS S3, RUNBOOKS_WAL_ASYNC=off":
                    f"{runbooks} wal-push --config {{config}} %p",
            }
            profiles = {
                "saturating": (None, f"pgbench `-c 4 -j 2 -T {args.seconds}`, as fast as it goes: TPC-B (weight 5) "
                                     "plus a bulk insert script (weight 1, 50 rows of ~430 bytes), a segment about "
                                     "every second, both cores busy"),
                "rate-limited": (args.rate, f"pgbench `-c 2 -j 2 -R {args.rate} -T {args.seconds}`: TPC-B and the bulk "
                                            "script at weight 1 each, a fixed rate (a busy server with CPU to spare)"),
            }
            lines += ["## archive_command latency per 16 MiB segment, under pgbench", "",
                      "`synchronous_commit=off`, fsync on. Latency = wall time of the archive_command as the archiver "
                      "runs it (a `date +%s%N` wrapper around it), for segments archived while pgbench ran; first = "
                      "the first segment of a fresh cluster (the daemon starting). Median over rounds of each round's "
                      "percentile, spread in brackets. The floor row times a bare start of the same interpreter once "
                      "a second during the same runs: no Python command can be faster than that.", ""]
            for profile, (rate, description) in profiles.items():
                runs: dict[str, list[LatencyRun]] = {name: [] for name in variants}
                for round_no in range(args.rounds):
                    for index, (name, template) in enumerate(variants.items()):
                        if index == 2 and (round_no > 0 or rate is not None):
                            continue  # the one-process-per-segment reference: one saturating round is enough
                        prefix = f"latency-{profile}-{round_no}-{index}"
                        extra = {"RUNBOOKS_WAL_ASYNC": "off"} if index == 2 else {}
                        command = template.format(config=bench.wal_config(s3, prefix, **extra))
                        shutil.rmtree(local_archive, ignore_errors=True)
                        bench.postgres_dir("guide-archive")
                        say(f"{profile} round {round_no + 1}: {name}, {args.seconds} s of pgbench")
                        result = bench.latency_run(name, command, work / f"{prefix}.log",
                                                   python=python if index == 1 else None, rate=rate)
                        runs[name].append(result)
                        say(f"  {len(result.latencies_ms)} segments, p50 {percentile(result.latencies_ms, 50):.0f} ms, "
                            f"p99 {percentile(result.latencies_ms, 99):.0f} ms, max backlog {result.max_backlog}, "
                            f"load {result.load}")
                lines += [f"### {profile}: {description}", "",
                          "| archive_command | segments | p50 | p99 | max | first | max `.ready` backlog | failures |",
                          "|---|---|---|---|---|---|---|---|"]
                lines += _latency_rows(runs, variants)
                lines.append("")
            lines += ["Targets: wal-push p50 <= 100 ms, p99 <= 300 ms.", ""]
            say("start-up of the commands, without pgbench")
            startup = bench.startup(python, bench.wal_config(s3, "startup"), s3)
            lines += ["### Start-up of the WAL commands (no pgbench running)", "",
                      "Each run as `runuser -u postgres -- ...` (runuser itself adds a few ms), in a data "
                      "directory.", "",
                      "| what | runs | p50 | max |", "|---|---|---|---|"]
            for key, title in (("bare", "`python -c pass` (the interpreter alone)"),
                               ("warm", "`runbooks wal-fetch` of a missing file, daemon running (the fast path: "
                                        "no Prefect, no boto3 imported)"),
                               ("cold", "the same with RUNBOOKS_WAL_ASYNC=off (boto3 and an S3 client per call)")):
                values = startup[key]
                lines.append(f"| {title} | {len(values)} | {percentile(values, 50):.0f} ms | {max(values):.0f} ms |")
            lines.append("")

        # 2. base backup of the bench dataset, and 3. restore
        archive_prefix = "dataset"
        config = bench.wal_config(s3, archive_prefix)
        settings = {"wal_level": "replica", "archive_mode": "on", "max_wal_senders": "4",
                    "archive_command": f"{runbooks} wal-push --config {config} %p"}
        pg = stack.enter_context(ScratchPostgres(password=secrets.token_urlsafe(12), settings=settings,
                                                 base_dir=str(work)))
        conn = PostgresConnection.from_url(pg.url)
        spec = DatasetSpec("bench", args.scale, args.rows)
        say(f"generating the bench dataset: {spec.describe()}")
        dataset = generate(conn, spec, say)
        total = int(bench.sql(pg, "SELECT sum(pg_database_size(datname)) FROM pg_database")[0][0])
        say(f"  {human_size(dataset.bytes_on_disk)} in the bench database, {human_size(total)} in the cluster")
        bench.wait_archived(pg, timeout=600)
        store = BackupStore(backend="s3", bucket=BUCKET, prefix=archive_prefix, endpoint_url=s3.endpoint_url,
                            region=s3.region, access_key_id=s3.access_key, secret_access_key=s3.secret_key)
        stack.enter_context(_quiet_prefect())
        from flows.pitr import pitr_base_backup, pitr_restore
        from tasks.manifest import new_set_id
        from tasks.pitr.base_backup import take_base_backup, wait_for_backup_wal

        baseline, flow_plain, flow_verify = Timed("baseline"), Timed("flow"), Timed("verify")
        # The step as the flow runs it, then the choices it makes against (docs/pitr.md, "Base backup cost").
        steps = {"step": {}, "pg_basebackup": {"use_pg_basebackup": True}, "sha256": {"manifest_checksums": "SHA256"}}
        step_times = {name: Timed(name) for name in steps}
        stored_sizes: dict[str, int] = {}
        cpu: dict[str, list[dict[str, float]]] = {"baseline": [], **{name: [] for name in steps}}
        segment_size = int(bench.sql(pg, "SELECT pg_size_bytes(current_setting('wal_segment_size'))")[0][0])

        def backup_step(**options: object):  # noqa: ANN202
            """The backup and its WAL in the store: a restorable backup, as the baseline's -X stream gives."""
            taken = take_base_backup.fn(conn, store, new_set_id(), **options)
            wait_for_backup_wal.fn(store, timeline=taken.timeline, start_lsn=taken.start_lsn,
                                   stop_lsn=taken.stop_lsn, segment_size=segment_size)
            return taken

        postmaster, weed = pg.postmaster_pid() or 0, s3._proc.pid if s3._proc else 0

        def with_cpu(key: str, fn):  # noqa: ANN001, ANN202
            before = cpu_snapshot(postmaster, weed)
            result = fn()
            after = cpu_snapshot(postmaster, weed)
            cpu[key].append({k: after[k] - before[k] for k in after})
            return result

        for round_no in range(args.rounds):
            say(f"round {round_no + 1}: pg_basebackup -Ft to a local directory")
            baseline.seconds.append(with_cpu("baseline", lambda: bench.baseline_basebackup(pg)))
            say(f"  {baseline.seconds[-1]:.1f} s, {human_size(bench.local_size)}; load {load_average()}")
            for name, options in steps.items():
                say(f"round {round_no + 1}: base backup step ({name}) -> zstd -> S3")
                started = time.monotonic()
                taken = with_cpu(name, lambda options=options: backup_step(**options))
                step_times[name].seconds.append(time.monotonic() - started)
                stored_sizes[name] = taken.parts[0].size
                say(f"  {step_times[name].seconds[-1]:.1f} s, {human_size(stored_sizes[name])} stored; "
                    f"load {load_average()}")
        for round_no in range(0 if args.only_base_backup else args.rounds):
            say(f"round {round_no + 1}: pitr-base-backup flow, verify=false and verify=true")
            started = time.monotonic()
            pitr_base_backup(postgres=conn, store=store, verify=False)
            flow_plain.seconds.append(time.monotonic() - started)
            started = time.monotonic()
            last_backup = pitr_base_backup(postgres=conn, store=store, verify=True)
            flow_verify.seconds.append(time.monotonic() - started)
            say(f"  {flow_plain.seconds[-1]:.1f} s / {flow_verify.seconds[-1]:.1f} s")

        restore, extract, replay = Timed("restore"), Timed("extract"), Timed("replay")
        wal_after = 0
        if not args.only_base_backup:
            say(f"pgbench for {args.restore_wal_seconds} s after the last base backup (WAL to replay)")
            bench.pgbench(pg, "-c", "2", "-T", str(args.restore_wal_seconds), "-n", database=spec.database)
            bench.wait_archived(pg, timeout=600)
            wal_after = int(bench.sql(
                pg, f"SELECT pg_current_wal_lsn() - '{last_backup.stop_lsn}'::pg_lsn")[0][0])
        for round_no in range(0 if args.only_base_backup else args.rounds):
            target_dir = work / f"restore-{round_no}"
            port = free_port()
            say(f"round {round_no + 1}: pitr-restore (latest) into {target_dir}")
            started = time.monotonic()
            result = pitr_restore(store=store, target_dir=str(target_dir), port=port, keep_archiving=False)
            restore.seconds.append(time.monotonic() - started)
            extract.seconds.append(result.extract_seconds)
            replay.seconds.append(result.recovery_seconds)
            ScratchPostgres.adopt(target_dir, port=port).stop()
            shutil.rmtree(target_dir, ignore_errors=True)
            say(f"  {restore.seconds[-1]:.1f} s (extract {result.extract_seconds:.1f} s); load {load_average()}")
        base = statistics.median(baseline.seconds)

        def ratio(timed: Timed) -> str:
            return f"{statistics.median(timed.seconds) / base:.2f}" if timed.seconds else "-"

        step_rows = {
            "step": "base backup steps of `pitr-base-backup` (default): `BASE_BACKUP` read off a replication "
                    "connection, CRC32C manifest -> zstd -> S3, until its last WAL segment is in S3 too",
            "pg_basebackup": "... with `use_pg_basebackup=true`: `pg_basebackup -Ft -D - -X none` stdout "
                             "-> zstd -> S3 (the server waits for the WAL, checking once a second)",
            "sha256": "... with `manifest_checksums=SHA256`",
        }
        lines += [
            "## Base backup and restore of the bench dataset", "",
            f"Dataset: {spec.describe()}, {human_size(total)} in the cluster; base backup "
            f"{human_size(bench.local_size)} as a local tar, {human_size(stored_sizes['step'])} stored "
            "(zstd level 1).", "",
            "CPU seconds (median): PostgreSQL / pg_basebackup / runbooks process (libpq, zstd, sha256, boto3) / "
            "SeaweedFS / everything else the machine ran meanwhile.", "",
            "| what | wall time | vs `pg_basebackup -Ft` | CPU seconds |", "|---|---|---|---|",
            f"| `pg_basebackup -Ft -D DIR --checkpoint=fast` (local directory, WAL streamed, fsync) "
            f"| {baseline.cell()} | 1.00 | {cpu_cell(cpu['baseline'])} |",
            *(f"| {title} | {step_times[name].cell()} | {ratio(step_times[name])} | {cpu_cell(cpu[name])} |"
              for name, title in step_rows.items()),
            f"| `pitr-base-backup` flow, verify=false (preflight WAL switch, backup, WAL check, manifest) "
            f"| {flow_plain.cell()} | {ratio(flow_plain)} | |",
            f"| `pitr-base-backup` flow, verify=true (also re-reads every file from S3 against backup_manifest) "
            f"| {flow_verify.cell()} | {ratio(flow_verify)} | |",
            f"| `pitr-restore` to the end of the archive: download + extract + pg_verifybackup + replay of "
            f"{human_size(wal_after)} WAL | {restore.cell()} | | |",
            f"| ... of which download and extract | {extract.cell()} | | |",
            f"| ... of which recovery (start, WAL fetch and replay, promotion) | {replay.cell()} | | |",
            "", "Target: base backup to S3 <= 1.3 x local `pg_basebackup -Ft`.", "", *NOTES.splitlines(), ""]
    header = [
        "# PITR benchmark", "",
        f"Command: `{args.command}` (from the repository root; `make bench` runs it).", "",
        f"Run {started_at:%Y-%m-%d %H:%M} UTC on {platform.node() or 'this machine'}: {os.cpu_count()} cores, "
        f"{platform.platform()}, PostgreSQL {bench_pg_version()}, SeaweedFS on loopback. Load average at start "
        f"{load_at_start}, at end {load_average()} (the machine is shared: other work runs meanwhile).", "",
    ]
    return "\n".join(header + lines) + "\n"


def bench_pg_version() -> str:
    done = subprocess.run([pg_tool("postgres"), "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip().rsplit(" ", 1)[-1] if done.returncode == 0 else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every measurement (median and spread)")
    parser.add_argument("--seconds", type=int, default=60, help="pgbench seconds per latency run")
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale of the bench dataset")
    parser.add_argument("--rows", type=int, default=3_000_000, help="rows of bench_items in the bench dataset")
    parser.add_argument("--restore-wal-seconds", type=int, default=30, help="pgbench after the last base backup")
    parser.add_argument("--rate", type=int, default=300, help="transactions/s of the rate-limited latency load")
    parser.add_argument("--quick", action="store_true", help="tiny dataset, short runs, one round, no report")
    parser.add_argument("--only-base-backup", action="store_true",
                        help="only the base backup rows (baseline and the step's variants), no report")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks-pitr.md"))
    parser.add_argument("--no-report", action="store_true", help="print the results only")
    parser.add_argument("--work", default=str(ROOT / ".bench" / "pitr"), help="scratch directory (gitignored)")
    args = parser.parse_args(argv)
    args.command = " ".join(["python", "bench/pitr.py", *(argv if argv is not None else sys.argv[1:])])
    if args.quick:
        args.rounds, args.seconds, args.scale, args.rows, args.restore_wal_seconds = 1, 15, 2, 100_000, 5
        args.no_report = True
    if args.only_base_backup:
        args.no_report = True
    if os.geteuid() != 0:
        print("bench/pitr.py runs clusters as the postgres OS user: run it as root", file=sys.stderr)
        return 2
    report = run(args)
    print(report)
    if not args.no_report:
        Path(args.output).write_text(report)
        say(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
