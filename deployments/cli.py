"""`runbooks`: the command line. Inventory (reads manifests only), running the backup, the demo.

Connections come from saved Blocks (by name) or URLs; a URL that carries a password is accepted only
from the environment (RUNBOOKS_POSTGRES_URL, RUNBOOKS_REDIS_URL), never from argv.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from tasks.errors import ConfigurationError, RunbookError

DEFAULT_STORE = "file:///var/backups/runbooks"


def _looks_like_url(text: str) -> bool:
    return "://" in text or text.startswith("/")


def resolve_store(ref: str | None) -> Any:
    """``--store``: a URL, a path, or the name of a saved Backup Store block; default $RUNBOOKS_STORE."""
    from blocks.store import BackupStore

    ref = ref or os.environ.get("RUNBOOKS_STORE") or DEFAULT_STORE
    return BackupStore.from_url(ref) if _looks_like_url(ref) else BackupStore.load(ref)


def resolve_connection(ref: str | None, env_var: str, kind: str) -> Any:
    """A Postgres/Redis connection from a Block name, a password-less URL, or ``env_var``."""
    from blocks.postgres import PostgresConnection
    from blocks.redis import RedisConnection

    block_type = PostgresConnection if kind == "postgres" else RedisConnection
    if ref is None:
        from_env = os.environ.get(env_var)
        return block_type.from_url(from_env) if from_env else None
    if not _looks_like_url(ref):
        return block_type.load(ref)
    if urlsplit(ref).password:
        raise ConfigurationError(
            f"--{kind} URL contains a password, which would show in the process list: "
            f"put the URL in ${env_var} or save a Block and pass its name"
        )
    return block_type.from_url(ref)


def cmd_backup_list(args: argparse.Namespace) -> int:
    from tasks.manifest import human_size
    from tasks.store import list_sets

    store = resolve_store(args.store)
    sets = list_sets(store.get_client())
    if args.json:
        print(json.dumps([_set_row(m) for m in sets], indent=2))
        return 0
    if not sets:
        print(f"no complete backup sets in {store.describe()}")
        return 0
    print(f"{'SET ID':<24} {'COMPLETED (UTC)':<20} {'PARTS':>5} {'STORED':>10} {'RAW':>10}  TAGS")
    for m in sets:
        print(f"{m.set_id:<24} {m.completed_at:%Y-%m-%d %H:%M:%S}  {len(m.parts):>5} {human_size(m.size):>10} "
              f"{human_size(m.raw_size):>10}  {','.join(m.tags)}")
    return 0


def _set_row(m: Any) -> dict[str, Any]:
    return {
        "set_id": m.set_id,
        "started_at": m.started_at.isoformat(),
        "completed_at": m.completed_at.isoformat(),
        "parts": len(m.parts),
        "size": m.size,
        "raw_size": m.raw_size,
        "tags": m.tags,
        "source": m.source,
    }


def cmd_backup_show(args: argparse.Namespace) -> int:
    from tasks.manifest import human_size
    from tasks.store import find_set

    manifest = find_set(resolve_store(args.store).get_client(), args.id)
    if args.json:
        print(manifest.to_bytes().decode(), end="")
        return 0
    print(f"set {manifest.set_id}  started {manifest.started_at:%Y-%m-%d %H:%M:%S}  "
          f"completed {manifest.completed_at:%Y-%m-%d %H:%M:%S} UTC  runbooks {manifest.runbooks_version}")
    for name, where in manifest.source.items():
        print(f"  source {name}: {where}")
    for p in manifest.parts:
        print(f"  {p.kind:<8} {p.name:<30} {human_size(p.size):>10} (raw {human_size(p.raw_size)})  "
              f"sha256 {p.sha256[:16]}  {p.tool} {p.tool_version}")
        for t in p.tables:
            print(f"      {t.qualified:<40} rows {t.rows:>10}  {t.checksum or '(count only)'}")
        if p.redis:
            print(f"      {p.redis.key_count} keys {p.redis.databases}  digest {p.redis.digest[:16]}")
        if p.files:
            print(f"      {p.files.files} files, {human_size(p.files.bytes)}  digest {p.files.digest[:16]}")
    return 0


def cmd_backup_run(args: argparse.Namespace) -> int:
    from flows.backup import backup

    postgres = resolve_connection(args.postgres, "RUNBOOKS_POSTGRES_URL", "postgres")
    redis = resolve_connection(args.redis, "RUNBOOKS_REDIS_URL", "redis")
    result = backup(
        store=resolve_store(args.store), postgres=postgres, databases=args.database or None,
        include_globals=not args.no_globals, redis=redis, paths=args.path or None, tags=args.tag or None,
    )
    print(f"backup set {result.set_id}: {result.parts} parts, {result.size} bytes stored in {result.store}")
    return 0


def cmd_backup_verify(args: argparse.Namespace) -> int:
    from flows.verify import verify_backup

    state = verify_backup(store=resolve_store(args.store), backup_id=args.id, return_state=True)
    result = state.result(raise_on_failure=False)
    if state.is_completed():
        print(f"set {result.set_id}: restore drill passed "
              f"({', '.join(f'{k} {v:.1f} s' for k, v in result.seconds.items())})")
        return 0
    print(f"runbooks: restore drill FAILED: {result}", file=sys.stderr)
    return 1


def cmd_demo(_args: argparse.Namespace) -> int:
    from deployments.demo import run_demo

    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runbooks", description="Production runbooks as Prefect flows.")
    commands = parser.add_subparsers(dest="command", required=True)

    backup = commands.add_parser("backup", help="backup sets: run, list, show").add_subparsers(
        dest="action", required=True)
    store_help = "store URL (file:///dir, s3://bucket/prefix?endpoint_url=...) or Backup Store block name"

    run = backup.add_parser("run", help="run the backup flow now")
    run.add_argument("--store", help=store_help)
    run.add_argument("--postgres", help="Postgres Connection block name or password-less URL "
                                        "(default: $RUNBOOKS_POSTGRES_URL)")
    run.add_argument("--database", action="append", help="database to dump (repeatable; default all)")
    run.add_argument("--no-globals", action="store_true", help="skip roles and tablespaces")
    run.add_argument("--redis", help="Redis Connection block name or URL (default: $RUNBOOKS_REDIS_URL)")
    run.add_argument("--path", action="append", help="directory to archive (repeatable)")
    run.add_argument("--tag", action="append", help="tag for the set (repeatable)")
    run.set_defaults(func=cmd_backup_run)

    listing = backup.add_parser("list", help="complete backup sets (those with a manifest)")
    listing.add_argument("--store", help=store_help)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_backup_list)

    show = backup.add_parser("show", help="one set's manifest")
    show.add_argument("id", help="set id, or 'latest'")
    show.add_argument("--store", help=store_help)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_backup_show)

    verify = backup.add_parser("verify", help="restore drill: restore into scratch servers and compare")
    verify.add_argument("id", help="set id, or 'latest'")
    verify.add_argument("--store", help=store_help)
    verify.set_defaults(func=cmd_backup_verify)

    demo = commands.add_parser("demo", help="back up a sandbox stack, restore it, and compare")
    demo.set_defaults(func=cmd_demo)
    return parser


# Commands with their own argument parsing, in their own modules, imported only when used: the WAL
# commands run once per segment from PostgreSQL's archive_command and must not import Prefect.
EXTERNAL_COMMANDS = {
    "wal-push": "deployments.wal",
    "wal-fetch": "deployments.wal",
    "up": "deployments.serve",
    "serve": "deployments.serve",
    "webhook": "deployments.webhook",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTERNAL_COMMANDS:
        import importlib

        module = importlib.import_module(EXTERNAL_COMMANDS[argv[0]])
        return int(module.main(argv))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RunbookError as exc:
        print(f"runbooks: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
