"""One measured `backup` flow run, alone in its own process: ``python -m bench.child < config.json``.

The configuration (it holds the database and S3 passwords) comes on stdin, never in argv. The timing
covers the flow call only: interpreter start and imports are recorded separately. Peak RSS is this
process's own high-water mark (VmHWM); pg_dump is our child and is reported apart from it.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

_STARTED = time.monotonic()


def main() -> int:
    config = json.load(sys.stdin)
    from pydantic import SecretStr

    from bench.measure import CpuMeter, status_kib
    from blocks.postgres import PostgresConnection
    from blocks.store import BackupStore
    from flows.backup import backup
    from tasks.manifest import manifest_key
    from tasks.store import read_manifest

    imported = time.monotonic()
    store_config = dict(config["store"])
    for secret in ("access_key_id", "secret_access_key"):
        if store_config.get(secret):
            store_config[secret] = SecretStr(store_config[secret])
    store = BackupStore(**store_config)
    postgres = PostgresConnection.from_url(config["postgres_url"])
    rss_before = status_kib("self", "VmRSS")
    meter = CpuMeter(services=config["services"])  # PostgreSQL, Prefect API, SeaweedFS, the machine
    meter.start()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)

    began = time.monotonic()
    result = backup(
        store=store, postgres=postgres, databases=[config["database"]],
        table_checksums=config["table_checksums"],
    )
    seconds = time.monotonic() - began

    own = resource.getrusage(resource.RUSAGE_SELF)
    tools = resource.getrusage(resource.RUSAGE_CHILDREN)  # pg_dump and pg_dumpall, reaped by us
    services = meter.delta()
    peak = status_kib("self", "VmHWM")
    client = store.get_client()
    manifest = read_manifest(client, result.set_id)
    dump = next(p for p in manifest.parts if p.kind == "postgres")
    report = {
        "seconds": seconds,
        "flow_reported_seconds": result.seconds,
        "startup_seconds": imported - _STARTED,
        "rss_before_flow_kib": rss_before,
        "peak_rss_kib": peak,
        "cpu_ours": (own.ru_utime + own.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime),
        "cpu_tools": tools.ru_utime + tools.ru_stime,
        "tools_peak_rss_kib": tools.ru_maxrss,
        "cpu_services": services,
        "set_id": result.set_id,
        "manifest_key": manifest_key(result.set_id),
        "dump_size": dump.size,
        "dump_task_seconds": dump.seconds,
        "dump_raw_size": dump.raw_size,
        "set_size": result.size,
        "tables": len(dump.tables),
    }
    Path(config["result_path"]).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
