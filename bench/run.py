"""`make bench`: how much a `backup` run costs against the bare dump, and against the guide's script.

Generates the bench database (deterministic, see bench/dataset.py) in a scratch PostgreSQL, starts
SeaweedFS and a Prefect API server on loopback, then measures in rounds, each variant in its own process:

  (a)  pg_dump -Fc -Z0 > /dev/null            the limit: nothing to compress, nothing to store
  (b)  pg_dump | gzip > file                   the guide's script
  (c)  `backup` flow -> local store            table checksums on (the default), and off
  (d)  `backup` flow -> SeaweedFS S3           table checksums on (the default), and off
  and (c) once more on a half-size dataset, to see whether peak RSS grows with the data.

Results go to stdout and to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.dataset import Dataset, DatasetSpec, generate  # noqa: E402
from bench.measure import CpuMeter, busy_cores, parent_pid  # noqa: E402
from bench.report import OTHER_SECTIONS, Sample, Variant, kept_sections, render  # noqa: E402
from blocks.postgres import PostgresConnection  # noqa: E402
from tasks.manifest import human_size  # noqa: E402
from tasks.process import child_env, pg_tool, tool_version  # noqa: E402
from tasks.scratch import free_port  # noqa: E402

BUCKET = "bench"
PRIORITY = -10  # nice value of every bench process: other work on a shared machine gets the leftovers
QUIET_CORES = 0.25  # before a measured run, wait until other work uses less than this many cores ...
QUIET_WAIT_BUDGET = 120.0  # ... but never wait longer than this in all
DISTURBED_SHARE = 0.15  # a run during which other work took this share of the machine is "disturbed"
FULL_DB, HALF_DB, EMPTY_DB = "bench", "bench_half", "bench_empty"
_T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[bench {time.monotonic() - _T0:6.0f} s] {text}", flush=True)


# ------------------------------------------------------------------------------------------ services


@contextmanager
def prefect_api(home: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Prefect API server on loopback with its own SQLite database; its start-up is never timed.

    Background services and the UI are off: they are not the flow's overhead and would only steal CPU.
    """
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(  # noqa: S603 - argv list
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--no-services", "--no-ui", "--analytics-off"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home,
    )
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"Prefect server exited ({server.returncode}); see {home / 'server.log'}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Prefect server did not answer within 120 s; see {home / 'server.log'}")
            time.sleep(0.3)
        yield url, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def descendants_named(root: int, name: str) -> list[int]:
    """Live descendants of ``root`` whose command name is ``name`` (e.g. the SeaweedFS server)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as handle:
                comm = handle.read().strip()
        except OSError:
            continue
        if comm != name:
            continue
        pid: int | None = int(entry)
        while pid and pid > 1:
            pid = parent_pid(pid)
            if pid == root:
                found.append(int(entry))
                break
    return found


# ------------------------------------------------------------------------------------------ variants


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.meter = CpuMeter()
        self.pg = PostgresConnection()  # replaced by the scratch server's once it runs
        self.pg_url = ""
        self.api_url = ""
        self.s3: dict[str, str] = {}
        self.store_dir = work / "store"
        self.logs = work / "logs"
        self.variants: dict[str, Variant] = {}
        self.cores = len(os.sched_getaffinity(0))
        self.quiet_budget = QUIET_WAIT_BUDGET
        self.waited = 0.0

    def wait_quiet(self) -> None:
        """Other people's work on a small machine skews timings: start each run on a quiet machine."""
        began = time.monotonic()
        load = busy_cores(0.5)
        if load <= QUIET_CORES or self.quiet_budget <= 0:
            return
        say(f"  machine busy with other work ({load:.1f} cores); waiting for it to calm down")
        while load > QUIET_CORES and time.monotonic() - began < min(60.0, self.quiet_budget):
            load = busy_cores(1.0)
        spent = time.monotonic() - began
        self.quiet_budget -= spent
        self.waited += spent

    # -- helpers --

    def _measure(self, key: str, run: Callable[[], Sample]) -> None:
        variant = self.variants[key]
        if variant.error:
            return
        self.wait_quiet()
        self.meter.start()
        try:
            sample = run()
        except Exception as exc:  # noqa: BLE001 - one failed variant must not hide the others
            variant.error = str(exc).splitlines()[0][:200]
            say(f"  {variant.title}: FAILED: {exc}")
            return
        if "machine" not in sample.cpu:  # a flow process measures its own window (the flow call)
            sample.cpu.update(self.meter.delta())
        machine = sample.cpu.pop("machine")
        sample.cpu["other"] = round(machine - sum(sample.cpu.values()), 2)
        sample.disturbed = sample.cpu["other"] > DISTURBED_SHARE * sample.seconds * self.cores
        variant.samples.append(sample)
        size = f", {human_size(sample.size)}" if sample.size else ""
        rss = f", peak RSS {sample.peak_rss_kib / 1024:.0f} MiB" if sample.peak_rss_kib else ""
        noisy = f" (disturbed: other work used {sample.cpu['other']:.1f} CPU s)" if sample.disturbed else ""
        say(f"  {variant.title}: {sample.seconds:.2f} s{size}{rss}{noisy}")

    def _dump_argv(self, *extra: str) -> list[str]:
        return [pg_tool("pg_dump"), "--no-password", *extra]

    def dump_to_null(self, database: str) -> Sample:
        """(a): the dump alone; its stdout goes nowhere."""
        env = child_env(self.pg.libpq_env(database))
        with open(self.logs / "pg_dump.err", "wb") as err:
            began = time.monotonic()
            proc = subprocess.Popen(  # noqa: S603 - argv list
                self._dump_argv("--format=custom", "--compress=0"),
                stdout=subprocess.DEVNULL, stderr=err, env=env,
            )
            _pid, status, usage = os.wait4(proc.pid, 0)
            seconds = time.monotonic() - began
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"pg_dump exited {proc.returncode}: {(self.logs / 'pg_dump.err').read_text()[-300:]}")
        return Sample(seconds=seconds, cpu={"tools": usage.ru_utime + usage.ru_stime})

    def dump_gzip(self, database: str) -> Sample:
        """(b): ``pg_dump dbname | gzip > file``, as the guide writes it (plain SQL format, gzip -6)."""
        env = child_env(self.pg.libpq_env(database))
        target = self.work / "guide.sql.gz"
        gzip = shutil.which("gzip") or "/bin/gzip"
        with open(target, "wb") as out, open(self.logs / "pg_dump.err", "wb") as err:
            began = time.monotonic()
            dump = subprocess.Popen(self._dump_argv(database), stdout=subprocess.PIPE, stderr=err, env=env)  # noqa: S603
            zipper = subprocess.Popen([gzip], stdin=dump.stdout, stdout=out)  # noqa: S603
            assert dump.stdout is not None
            dump.stdout.close()
            cpu = 0.0
            for proc in (dump, zipper):
                _pid, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                cpu += usage.ru_utime + usage.ru_stime
            seconds = time.monotonic() - began
        size = target.stat().st_size
        target.unlink()
        if dump.returncode or zipper.returncode:
            raise RuntimeError(f"pg_dump | gzip exited {dump.returncode}/{zipper.returncode}")
        return Sample(seconds=seconds, size=size, cpu={"tools": cpu})

    def flow_run(self, database: str, store: str, *, checksums: bool, log_name: str) -> Sample:
        """(c)/(d): the `backup` flow in a fresh Python process; the stored set is deleted afterwards."""
        result_path = self.work / "child-result.json"
        result_path.unlink(missing_ok=True)
        if store == "local":
            store_config: dict[str, object] = {"backend": "local", "path": str(self.store_dir)}
        else:
            store_config = {"backend": "s3", "bucket": BUCKET, **self.s3}
        config = {"postgres_url": self.pg_url, "database": database, "store": store_config,
                  "table_checksums": checksums, "result_path": str(result_path),
                  "services": self.meter.services}
        env = {**os.environ, "PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.work / "prefect"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT)}
        with open(self.logs / f"{log_name}.log", "ab") as log:
            child = subprocess.Popen(  # noqa: S603 - argv list; secrets go through stdin
                [sys.executable, "-m", "bench.child"], stdin=subprocess.PIPE, stdout=log, stderr=log,
                env=env, cwd=ROOT,
            )
            assert child.stdin is not None
            child.stdin.write(json.dumps(config).encode())
            child.stdin.close()
            code = child.wait()
        if code != 0 or not result_path.exists():
            raise RuntimeError(f"flow process exited {code}; see {self.logs / (log_name + '.log')}")
        report = json.loads(result_path.read_text())
        self._discard(store, report["set_id"])
        return Sample(
            seconds=report["seconds"], size=report["dump_size"], peak_rss_kib=report["peak_rss_kib"],
            cpu={"ours": round(report["cpu_ours"], 2), "tools": round(report["cpu_tools"], 2),
                 **report["cpu_services"]},
            startup_seconds=report["startup_seconds"], rss_before_flow_kib=report["rss_before_flow_kib"],
            task_seconds=report["dump_task_seconds"],
        )

    def _discard(self, store: str, set_id: str) -> None:
        """Keep the disk small: the measured sets are not needed after their size is read."""
        if store == "local":
            shutil.rmtree(self.store_dir / "backups" / set_id, ignore_errors=True)
            return
        from pydantic import SecretStr

        from blocks.store import BackupStore

        client = BackupStore(
            backend="s3", bucket=BUCKET, endpoint_url=self.s3["endpoint_url"], region=self.s3["region"],
            access_key_id=SecretStr(self.s3["access_key_id"]),
            secret_access_key=SecretStr(self.s3["secret_access_key"]),
        ).get_client()
        for obj in client.list(f"backups/{set_id}/"):
            client.delete(obj.key)


# ------------------------------------------------------------------------------------------- main


def machine() -> tuple[int, str]:
    cores = len(os.sched_getaffinity(0))
    ram_kib = 0
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                ram_kib = int(line.split()[1])
    return cores, f"{cores} cores (`nproc`), {ram_kib / 1024 / 1024:.1f} GiB RAM, {platform.platform(terse=True)}"


def raise_priority() -> str:
    """Run this process, and so every server and tool it starts, ahead of other work (root only)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, PRIORITY)
    except PermissionError:
        return "normal (raising it needs root): other work on the machine competes on equal terms"
    return f"nice {PRIORITY} for every bench process (PostgreSQL, Prefect API, SeaweedFS, tools, flows)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured runs of each variant (median reported)")
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale of the full dataset")
    parser.add_argument("--rows", type=int, default=3_000_000, help="rows of bench_items in the full dataset")
    parser.add_argument("--quick", action="store_true",
                        help="tiny dataset, one round, no report: checks that the bench works")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"), help="report to write")
    parser.add_argument("--no-report", action="store_true", help="print the results only")
    parser.add_argument("--work", default=str(ROOT / ".bench"), help="scratch directory (gitignored)")
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.rows, args.rounds, args.no_report = 2, 100_000, 1, True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the scratch servers below are stopped and removed, not orphaned.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    shutil.rmtree(bench.store_dir, ignore_errors=True)
    shutil.rmtree(bench.logs, ignore_errors=True)
    bench.logs.mkdir()
    cores, machine_text = machine()
    started_at = datetime.now(UTC)
    say(f"machine: {machine_text}")
    priority = raise_priority()
    say(f"priority: {priority}")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from psycopg import sql

    from deployments.sandbox import SeaweedS3
    from tasks.scratch import ScratchPostgres

    with ExitStack() as stack:
        say("starting a scratch PostgreSQL")
        scratch = stack.enter_context(
            ScratchPostgres(password=secrets.token_urlsafe(12), fast=True, base_dir=str(work)))
        bench.pg_url = scratch.url
        bench.pg = pg = PostgresConnection.from_url(scratch.url)
        with pg.connect() as conn:
            server_version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        full = DatasetSpec(FULL_DB, args.scale, args.rows)
        datasets: dict[str, Dataset] = {}
        for spec in (full, full.half(HALF_DB)):
            say(f"generating {spec.database}: {spec.describe()}")
            datasets[spec.database] = generate(pg, spec, say)
            say(f"  {spec.database}: {human_size(datasets[spec.database].bytes_on_disk)} on disk, "
                f"{datasets[spec.database].seconds:.0f} s")

        with pg.connect(autocommit=True) as admin:  # for the fixed cost of a run: nothing to dump
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(EMPTY_DB)))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(EMPTY_DB)))

        say("starting SeaweedFS (S3 on loopback)")
        seaweed = stack.enter_context(SeaweedS3(bucket=BUCKET, base_dir=str(work)))
        bench.s3 = {"endpoint_url": seaweed.endpoint_url, "region": seaweed.region,
                    "access_key_id": seaweed.access_key, "secret_access_key": seaweed.secret_key}

        say("starting a Prefect API server (not timed)")
        bench.api_url, api_server = stack.enter_context(prefect_api(work / "prefect"))
        services = {"postgres": scratch.postmaster_pid() or 0, "prefect_api": api_server.pid}
        weed = descendants_named(os.getpid(), "weed")
        if weed:
            services["seaweedfs"] = weed[0]
        bench.meter.services = services

        rounds = args.rounds
        bench.variants = {
            "a": Variant("a", "(a) `pg_dump -Fc -Z0 > /dev/null`"),
            "b": Variant("b", "(b) `pg_dump \\| gzip > file`"),
            "c": Variant("c", "(c) `backup` -> local store", limit=1.15),
            "c0": Variant("c0", "(c) `backup` -> local store, `table_checksums=False`", limit=1.15),
            "d": Variant("d", "(d) `backup` -> SeaweedFS S3", limit=1.4),
            "d0": Variant("d0", "(d) `backup` -> SeaweedFS S3, `table_checksums=False`", limit=1.4),
            "c-half": Variant("c-half", "(c) `backup` -> local store, half-size dataset"),
            "c-empty": Variant("c-empty", "fixed cost: `backup` of an empty database -> local store"),
            "d-empty": Variant("d-empty", "fixed cost: `backup` of an empty database -> SeaweedFS S3"),
        }
        plan = {
            "a": lambda: bench.dump_to_null(FULL_DB),
            "b": lambda: bench.dump_gzip(FULL_DB),
            "c": lambda: bench.flow_run(FULL_DB, "local", checksums=True, log_name="c"),
            "c0": lambda: bench.flow_run(FULL_DB, "local", checksums=False, log_name="c0"),
            "d": lambda: bench.flow_run(FULL_DB, "s3", checksums=True, log_name="d"),
            "d0": lambda: bench.flow_run(FULL_DB, "s3", checksums=False, log_name="d0"),
            "c-empty": lambda: bench.flow_run(EMPTY_DB, "local", checksums=True, log_name="c-empty"),
            "d-empty": lambda: bench.flow_run(EMPTY_DB, "s3", checksums=True, log_name="d-empty"),
        }

        say("warming up: one untimed dump (page cache) and one untimed flow run (Prefect registrations)")
        bench.dump_to_null(FULL_DB)
        bench.flow_run(HALF_DB, "local", checksums=False, log_name="warmup")
        order = list(plan)
        for number in range(rounds):
            say(f"round {number + 1} of {rounds}")
            shift = number % len(order)
            for key in order[shift:] + order[:shift]:  # rotate so no variant always runs first
                bench._measure(key, plan[key])
        say("half-size dataset: (c) again, for peak RSS against data size")
        for _ in range(max(1, min(rounds, 2))):
            bench._measure("c-half", lambda: bench.flow_run(HALF_DB, "local", checksums=True, log_name="c-half"))

    pg_dump_version = tool_version(pg_tool("pg_dump"))
    meta = {
        "command": "`make bench` (runs `.venv/bin/python bench/run.py`)"
                   + (f"; this run: `bench/run.py {' '.join(argv or sys.argv[1:])}`" if (argv or sys.argv[1:]) else ""),
        "date": f"{started_at:%Y-%m-%d %H:%M} UTC",
        "machine": machine_text,
        "PostgreSQL": f"{server_version} (server), {pg_dump_version}",
        "dataset": f"{full.describe()}; {human_size(datasets[FULL_DB].bytes_on_disk)} on disk "
                   f"(`pg_database_size`); half-size: {full.half(HALF_DB).describe()}, "
                   f"{human_size(datasets[HALF_DB].bytes_on_disk)}",
        "priority": priority,
        "rounds": f"{rounds} per variant (median and range shown); half-size (c): "
                  f"{len(bench.variants['c-half'].samples)}",
    }
    method = [
        "One scratch PostgreSQL cluster (`tasks.scratch.ScratchPostgres`, fast mode: fsync off, which does "
        "not matter to read-only dumps) holds both datasets, generated afresh by every run; the tables are "
        "`VACUUM (FREEZE, ANALYZE)`d so dumps never write hint bits. Data fits in the page cache; an "
        "untimed dump warms it first.",
        "(a) and (b) are timed from process start to exit. (b) is the guide's `pg_dump dbname | gzip > file` "
        "(plain SQL, gzip's default level 6, no fsync).",
        "(c) and (d) each run in a fresh Python process (`bench/child.py`) against a Prefect API server "
        "started once beforehand (`prefect server start --no-services`, its start-up not timed). The time is "
        "the `backup(...)` flow call: flow and task run creation, API calls, artifacts, globals dump, the "
        "database dump, the table checksums read off the dump's COPY data, zstd (level 1, 2 threads, the "
        "flow's defaults), sha256, the store write (fsync "
        "for the local store; 8 MiB multipart parts, 4 in flight, for S3) and the manifest.",
        "Compressed size: the database part of the set (the globals part is a few hundred bytes more).",
        "Peak RSS: VmHWM of the flow's own Python process (threads included; pg_dump, a child, is not "
        "counted). An untimed flow run on the half-size database precedes the rounds.",
        "Rounds interleave the variants, rotating the order each round. The machine may be shared: before "
        f"each run the bench waits (up to {QUIET_WAIT_BUDGET:.0f} s in all) until other work uses under "
        f"{QUIET_CORES} cores, and a run during which other work took over {DISTURBED_SHARE:.0%} of the "
        "machine's CPU counts as disturbed: medians use the undisturbed runs when there are any. This run "
        f"waited {bench.waited:.0f} s.",
        "Ratio to (a): each round's run over the same round's (a), then the median over rounds (undisturbed "
        "rounds). This virtual machine's speed drifts within minutes ((a) took 4.51-6.09 s in one earlier run); "
        "pairing runs of "
        "the same round cancels most of that, where a ratio of two separate medians does not. The targets "
        "are judged on this ratio.",
    ]
    text = render(meta, bench.variants, cores, method)
    print()
    print(text)
    if not args.no_report:
        output = Path(args.output)
        if output.exists():
            text = kept_sections(output.read_text(), text, OTHER_SECTIONS)
        output.write_text(text)
        say(f"wrote {args.output}")
    failed = [v.title for v in bench.variants.values() if v.error]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
