"""The data path's knobs, measured without Prefect: ``python bench/knobs.py [--s3]``.

Not part of `make bench` (it takes a few minutes more). Each trial runs in its own process and streams
``pg_dump -Fc -Z0`` of the bench database through ``tasks.stream.compress_into_store`` into a local or S3
store, the way ``dump_database`` does, with one knob changed: zstd level and threads, the pipe's size,
the read chunk, the S3 part size and concurrency. It also times the per-table checksum query and a
cheaper candidate. CPU seconds per party are reported next to wall time because, on a small shared
machine, they are the steadier figure. $RUNBOOKS_BENCH_POSTGRES_URL names an existing server that holds
the bench database (kept out of argv: it carries the password); otherwise a scratch one is generated.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.measure import CpuMeter, busy_cores, median  # noqa: E402

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named in Python 3.10+ only on some builds

# The SQL checksum collect_checksums runs per table (h64sum: how sets were checksummed before the checksums were
# read off the dump stream, and how such sets are still verified), and a candidate that skips the text output.
CHECKSUM_QUERIES = {
    "sum(hashtextextended(t::text, 0))  (h64sum)":
        "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text FROM ONLY {} AS t",
    "sum(hash_record_extended(t, 0))  (candidate)":
        "SELECT count(*), coalesce(sum(hash_record_extended(t, 0)), 0)::text FROM ONLY {} AS t",
    "count(*) only  (the scan alone)": "SELECT count(*) FROM ONLY {} AS t",
}


def wait_quiet(limit: float = 60.0) -> None:
    """Start a trial when other work on the machine uses under a quarter of a core (or after ``limit``)."""
    deadline = time.monotonic() + limit
    while busy_cores(0.5) > 0.25 and time.monotonic() < deadline:
        pass


def trial(config: dict[str, object]) -> dict[str, float]:
    """One streamed dump in this process; returns wall, CPU and peak RSS."""
    import tasks.stream as stream
    from blocks.store import BackupStore
    from tasks.process import pg_tool, spawn

    stream.CHUNK = int(config["chunk"])  # type: ignore[arg-type]
    store = BackupStore(**config["store"]).get_client()  # type: ignore[arg-type]
    key = f"knobs/{secrets.token_hex(4)}.zst"
    before = resource.getrusage(resource.RUSAGE_SELF)
    began = time.monotonic()
    with spawn([pg_tool("pg_dump"), "--format=custom", "--compress=0", "--no-password"],
               env=config["libpq_env"]) as child:  # type: ignore[arg-type]
        if config["pipe"]:
            fcntl.fcntl(child.stdout.fileno(), F_SETPIPE_SZ, int(config["pipe"]))  # type: ignore[arg-type]
        result = stream.compress_into_store(store, key, child.stdout, level=int(config["level"]),  # type: ignore[arg-type]
                                            threads=int(config["threads"]))  # type: ignore[arg-type]
        if child.wait() != 0:
            raise RuntimeError(f"pg_dump failed: {child.stderr_tail()}")
    seconds = time.monotonic() - began
    own = resource.getrusage(resource.RUSAGE_SELF)
    tools = resource.getrusage(resource.RUSAGE_CHILDREN)
    store.delete(key)
    return {
        "seconds": seconds, "size": result.size,
        "ours": own.ru_utime + own.ru_stime - before.ru_utime - before.ru_stime,
        "tools": tools.ru_utime + tools.ru_stime, "peak_rss_mib": own.ru_maxrss / 1024,
    }


def run_trial(config: dict[str, object], services: dict[str, int]) -> dict[str, float]:
    meter = CpuMeter(services=services)
    meter.start()
    done = subprocess.run(  # noqa: S603 - argv list; the config (with the password) goes through stdin
        [sys.executable, str(Path(__file__).resolve()), "--trial"], input=json.dumps(config).encode(),
        capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode()[-2000:])
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    cpu = meter.delta()
    result["postgres"] = cpu.get("postgres", 0.0)
    result["other"] = cpu["machine"] - cpu.get("postgres", 0.0) - cpu.get("seaweedfs", 0.0) - result["ours"] \
        - result["tools"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trial", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--database", default="bench")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="also try S3 part sizes against SeaweedFS")
    args = parser.parse_args()
    if args.trial:
        print(json.dumps(trial(json.load(sys.stdin))))
        return 0
    # SIGTERM unwinds like Ctrl-C, so the scratch servers below are stopped and removed, not orphaned.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))

    from psycopg import sql

    from blocks.postgres import PostgresConnection

    work = ROOT / ".bench" / "knobs"
    work.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        existing = os.environ.get("RUNBOOKS_BENCH_POSTGRES_URL")
        if existing:
            pg = PostgresConnection.from_url(existing)
        else:
            from bench.dataset import DatasetSpec, generate
            from tasks.scratch import ScratchPostgres

            scratch = stack.enter_context(ScratchPostgres(fast=True, base_dir=str(work)))
            pg = PostgresConnection.from_url(scratch.url)
            generate(pg, DatasetSpec(args.database, 50, 3_000_000), print)
        with pg.connect() as conn:
            backend = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        from bench.measure import parent_pid

        services = {"postgres": parent_pid(backend) or 0}
        local = {"backend": "local", "path": str(work / "store")}
        base = {"libpq_env": pg.libpq_env(args.database), "store": local, "level": 1, "threads": 2,
                "pipe": 0, "chunk": 1 << 20}
        trials: dict[str, dict[str, object]] = {
            "today: level 1, threads 2, 64 KiB pipe, 1 MiB chunk": {},
            "threads 0 (compress in the reading thread)": {"threads": 0},
            "threads 1": {"threads": 1},
            "pipe 1 MiB (F_SETPIPE_SZ)": {"pipe": 1 << 20},
            "pipe 1 MiB + threads 0": {"pipe": 1 << 20, "threads": 0},
            "chunk 256 KiB": {"chunk": 256 << 10},
            "chunk 4 MiB": {"chunk": 4 << 20},
            "level 3": {"level": 3},
        }
        if args.s3:
            from bench.run import descendants_named
            from deployments.sandbox import SeaweedS3

            seaweed = stack.enter_context(SeaweedS3(bucket="knobs", base_dir=str(work)))
            weed = descendants_named(os.getpid(), "weed")
            if weed:
                services["seaweedfs"] = weed[0]
            s3 = {"backend": "s3", "bucket": "knobs", "endpoint_url": seaweed.endpoint_url,
                  "region": seaweed.region, "access_key_id": seaweed.access_key,
                  "secret_access_key": seaweed.secret_key}
            for part, flight in ((8, 4), (8, 2), (16, 2), (32, 2)):
                trials[f"S3, {part} MiB parts, {flight} in flight"] = {
                    "store": {**s3, "part_size_mib": part, "max_concurrency": flight}}

        results: dict[str, list[dict[str, float]]] = {name: [] for name in trials}
        run_trial({**base}, services)  # warm the page cache
        for number in range(args.rounds):
            for name, change in trials.items():
                wait_quiet()
                result = run_trial({**base, **change}, services)
                results[name].append(result)
                print(f"round {number + 1}: {name}: {result['seconds']:.2f} s, ours {result['ours']:.1f} CPU s, "
                      f"pg_dump {result['tools']:.1f}, PostgreSQL {result['postgres']:.1f}, "
                      f"other {result['other']:.1f}, {result['size'] / 2**20:.1f} MiB, "
                      f"peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)

        print("\n| trial | wall (median) | ours CPU s | pg_dump CPU s | PostgreSQL CPU s | size | peak RSS |")
        print("|---|---|---|---|---|---|---|")
        for name, rows in results.items():
            def mid(field: str, rows: list[dict[str, float]] = rows) -> float:
                return median([r[field] for r in rows])
            print(f"| {name} | {mid('seconds'):.2f} s | {mid('ours'):.2f} | {mid('tools'):.2f} | "
                  f"{mid('postgres'):.2f} | {mid('size') / 2**20:.1f} MiB | {mid('peak_rss_mib'):.0f} MiB |")

        print("\n| checksum query (all tables, one after the other) | wall | PostgreSQL CPU s |")
        print("|---|---|---|")
        with pg.connect(args.database) as conn:
            tables = [sql.Identifier(schema, name) for schema, name in conn.execute(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind = 'r' AND n.nspname = 'public'").fetchall()]
            for name, template in CHECKSUM_QUERIES.items():
                runs = []
                for _ in range(args.rounds):
                    wait_quiet()
                    meter = CpuMeter(services=services)
                    meter.start()
                    began = time.monotonic()
                    for table in tables:
                        conn.execute(sql.SQL(template).format(table))
                    runs.append((time.monotonic() - began, meter.delta()["postgres"]))
                print(f"| `{name}` | {median([r[0] for r in runs]):.2f} s | {median([r[1] for r in runs]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
