"""`runbooks sandbox` (`make sandbox`): the Prefect UI to click through the runbooks, on throwaway services.

Starts a scratch PostgreSQL (``postgres`` and the application database ``shop``, seeded as in the demo), a
password-protected Redis (seeded), a local store directory, a SeaweedFS S3 with a bucket and a media
directory, and, while they start, `runbooks up`'s Prefect server. Once the server answers, the Blocks the
deployments' defaults name are saved (``backup-store/backups``, ``postgres-connection/app-db``,
``redis-connection/app-redis``, plus ``backup-store/s3``), then the runbooks are served against them: a Run
click works at once. Ctrl-C (or SIGTERM) stops everything and removes every directory it created.

Passwords are random per start, kept in the services' own files and the saved Blocks; never printed.
``kill -USR1 <pid>`` writes the stack of every thread of this process to its stderr (a start that hangs).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("runbooks.sandbox")

APP_DATABASE = "shop"  # deployments.demo.DEMO_DB (not imported at module level: it imports psycopg)
S3_BUCKET = "backups"

BLOCKS = {
    "store": "backup-store/backups",
    "s3_store": "backup-store/s3",
    "postgres": "postgres-connection/app-db",
    "redis": "redis-connection/app-redis",
}


@dataclass
class Services:
    """The throwaway services and where their data lives."""

    postgres: object  # tasks.scratch.ScratchPostgres
    redis: object  # tasks.scratch.ScratchRedis
    s3: object  # deployments.sandbox.SeaweedS3
    store_dir: Path
    media_dir: Path

    def describe(self) -> dict[str, object]:
        """What `sandbox.json` and the start message say about them (no passwords)."""
        pg, rd, s3 = self.postgres, self.redis, self.s3
        return {
            "postgres": f"postgresql://postgres@{pg.host}:{pg.port}/postgres",  # type: ignore[attr-defined]
            "postgres_dir": str(pg.base),  # type: ignore[attr-defined]
            "app_database": APP_DATABASE,
            "redis": f"redis://{rd.host}:{rd.port}/0",  # type: ignore[attr-defined]
            "redis_dir": str(rd.dir),  # type: ignore[attr-defined]
            "s3": s3.endpoint_url,  # type: ignore[attr-defined]
            "s3_dir": str(s3.dir),  # type: ignore[attr-defined]
            "s3_bucket": S3_BUCKET,
            "store_dir": str(self.store_dir),
            "media_dir": str(self.media_dir),
            "blocks": BLOCKS,
        }


def start_services(home: Path, stack: ExitStack) -> Services:
    """Start and seed every service; each is stopped (and its directory removed) when ``stack`` closes."""
    from deployments.demo import seed_files, seed_postgres, seed_redis
    from deployments.sandbox import SeaweedS3
    from tasks.scratch import ScratchPostgres
    from tasks.scratch_redis import ScratchRedis

    pg = stack.enter_context(ScratchPostgres(password=secrets.token_urlsafe(16), fast=True))
    seed_postgres(pg.url)
    rd = stack.enter_context(ScratchRedis(password=secrets.token_urlsafe(16)))
    import redis

    with redis.Redis(host=rd.host, port=rd.port, password=rd.password) as client:
        keys = seed_redis(client)
    s3 = stack.enter_context(SeaweedS3(bucket=S3_BUCKET))
    store_dir, media_dir = home / "store", home / "media"
    store_dir.mkdir(exist_ok=True)
    media_dir.mkdir(exist_ok=True)
    seed_files(media_dir)
    log.info("services up: PostgreSQL on %s:%d (database %r seeded), Redis on %s:%d (%d keys), S3 %s, store %s",
             pg.host, pg.port, APP_DATABASE, rd.host, rd.port, keys, s3.endpoint_url, store_dir)
    return Services(postgres=pg, redis=rd, s3=s3, store_dir=store_dir, media_dir=media_dir)


def save_blocks(services: Services, env: Mapping[str, str]) -> None:
    """Save the Blocks the deployments' defaults name, on the server in ``env`` (overwriting older ones)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from pydantic import SecretStr

    from blocks.postgres import PostgresConnection
    from blocks.redis import RedisConnection
    from blocks.store import BackupStore

    pg, rd, s3 = services.postgres, services.redis, services.s3
    updates = {PREFECT_API_URL: env["PREFECT_API_URL"]}
    if env.get("PREFECT_API_AUTH_STRING"):
        updates[PREFECT_API_AUTH_STRING] = env["PREFECT_API_AUTH_STRING"]
    with temporary_settings(updates=updates):
        BackupStore(backend="local", path=str(services.store_dir)).save("backups", overwrite=True)
        BackupStore(backend="s3", bucket=S3_BUCKET, endpoint_url=s3.endpoint_url,  # type: ignore[attr-defined]
                    region=s3.region, access_key_id=SecretStr(s3.access_key),  # type: ignore[attr-defined]
                    secret_access_key=SecretStr(s3.secret_key)).save("s3", overwrite=True)  # type: ignore[attr-defined]
        PostgresConnection.from_url(pg.url).save("app-db", overwrite=True)  # type: ignore[attr-defined]
        RedisConnection(host=rd.host, port=rd.port,  # type: ignore[attr-defined]
                        password=SecretStr(rd.password)).save("app-redis", overwrite=True)  # type: ignore[attr-defined]
    log.info("saved Blocks: %s", ", ".join(BLOCKS.values()))


def wait_for_deployments(api: str, timeout: float = 180.0) -> int:
    """Wait until `runbooks serve` has created a deployment for every runbook of the registry; returns the count."""
    import time
    import urllib.request

    from deployments.registry import RUNBOOKS

    expected = sum(1 for rb in RUNBOOKS if rb.module_path.exists())
    deadline, count = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        request = urllib.request.Request(f"{api}/deployments/count", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback URL we built
                count = int(json.load(response))
        except (OSError, ValueError):
            count = 0
        if count >= expected:
            return count
        time.sleep(0.5)
    log.warning("only %d of %d deployments after %.0f s: see serve.log", count, expected, timeout)
    return count


def first_steps(ui: str, about: Mapping[str, object]) -> str:
    """What the operator sees once everything runs: where things are and what to click first."""
    return "\n".join([
        "",
        f"runbooks sandbox: ready. Open {ui}",
        f"  PostgreSQL {about['postgres']} (databases postgres and {about['app_database']}), "
        f"Redis {about['redis']}, S3 {about['s3']} (bucket {about['s3_bucket']}), store {about['store_dir']}, "
        f"media {about['media_dir']}",
        "  saved Blocks: " + ", ".join(BLOCKS.values()),
        "  1. Deployments > backup / nightly > Run > Quick run: the run's page shows it Completed, its Artifacts tab "
        "the backup report",
        "  2. verify-backup / after-nightly > Run > Quick run: the restore drill of that set into scratch servers",
        "  3. disaster-recovery > Run > Custom run: pick app-db (postgres) and app-redis (redis), Submit; the run "
        "pauses for approval: its menu (top right) > Resume; reject, and nothing changes",
        "  Ctrl-C stops everything and removes it.",
        "",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runbooks sandbox",
        description="`runbooks up` on throwaway PostgreSQL, Redis, store and S3 with seeded data and saved Blocks. "
                    "Ctrl-C stops everything and removes it.")
    parser.add_argument("--home", help="state directory (default: a new temporary one); removed at the end if this "
                                       "command created it")
    parser.add_argument("--port", type=int, default=4200, help="Prefect server/UI port on 127.0.0.1 (default 4200)")
    parser.add_argument("--webhook-port", type=int, default=9095, help="the bridge's port on 127.0.0.1")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between the runner's checks for runs")
    return parser


def up_arguments(args: argparse.Namespace, home: Path) -> argparse.Namespace:
    """`runbooks up`'s arguments for the sandbox: loopback only, its own home."""
    from deployments.serve import build_parser as up_parser

    argv = ["--home", str(home), "--host", "127.0.0.1", "--port", str(args.port), "--webhook-host", "127.0.0.1",
            "--webhook-port", str(args.webhook_port), "--poll", str(args.poll)]
    return up_parser("up").parse_args(argv)


def run_sandbox(args: argparse.Namespace) -> int:
    from deployments.serve import up_main

    created = args.home is None or not Path(args.home).exists()
    home = Path(args.home or tempfile.mkdtemp(prefix="runbooks-sandbox-")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The server, serve and this process's Block saves all use this state, never ~/.runbooks or ~/.prefect.
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    for name in ("PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING"):
        os.environ.pop(name, None)  # loopback only: API auth off, as `runbooks up` on 127.0.0.1
    ui = f"http://127.0.0.1:{args.port}"
    services: list[Services] = []
    failure: list[BaseException] = []

    with ExitStack() as stack:
        def start() -> None:
            try:
                services.append(start_services(home, stack))
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                failure.append(exc)

        # The services start while the Prefect server does (it takes the longest).
        starter = threading.Thread(target=start, name="sandbox-services", daemon=True)
        starter.start()
        try:
            def before_serve(env: Mapping[str, str]) -> None:
                starter.join()
                if failure:
                    raise RuntimeError(f"a sandbox service did not start: {failure[0]}")
                save_blocks(services[0], env)

            def on_ready() -> None:
                wait_for_deployments(f"{ui}/api")
                about = {"ui": ui, "api": f"{ui}/api", "home": str(home), **services[0].describe()}
                (home / "sandbox.json").write_text(json.dumps(about, indent=2) + "\n")
                print(first_steps(ui, about), flush=True)

            return up_main(up_arguments(args, home), before_serve=before_serve, on_ready=on_ready)
        finally:
            starter.join()  # a start still under way is finished, then stopped with the rest
            print("runbooks sandbox: stopping PostgreSQL, Redis and S3, removing their data", flush=True)
            stack.close()
            if created:
                shutil.rmtree(home, ignore_errors=True)
            print("runbooks sandbox: stopped" + (f", {home} removed" if created else ""), flush=True)


def dump_stacks_on_sigusr1() -> None:
    """SIGUSR1 writes every thread's stack to stderr, and the process goes on: what a hung start waits for."""
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv)[1:])
    dump_stacks_on_sigusr1()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return run_sandbox(args)


if __name__ == "__main__":
    sys.exit(main(["sandbox", *sys.argv[1:]]))
