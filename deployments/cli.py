"""`runbooks`: the command line. Inventory (reads manifests only), running the backup, the demo; `--help` lists
every command, those parsed by their own modules (up, sandbox, serve, webhook, WAL) included.

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

from blocks.backends import DEFAULT_STORE
from blocks.errors import ConfigurationError, RunbookError


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


def cmd_recover_status(args: argparse.Namespace) -> int:
    """Show a recovery's journal and what exists now; with --undo put back what a dead recovery changed."""
    from tasks.recovery import describe, read_journal, write_journal

    store = resolve_store(args.store)
    journal = read_journal(store.get_client(), args.id)
    print(describe(journal))
    postgres = resolve_connection(args.postgres, "RUNBOOKS_POSTGRES_URL", "postgres")
    redis = resolve_connection(args.redis, "RUNBOOKS_REDIS_URL", "redis")
    if postgres is not None:
        from tasks.databases import existing_databases

        for t in (t for t in journal.targets if t.kind == "postgres"):
            names = [n for n in (t.live, t.beside, t.kept) if n]
            present = set(existing_databases.fn(postgres, names))
            print(f"  now on {postgres.describe()}: " + ", ".join(
                f"{n!r} {'exists' if n in present else 'absent'}" for n in names))
    if redis is not None and journal.redis_safety_copy is not None and journal.redis_safety_copy.redis:
        from tasks.redis import keyspace_digest

        now = keyspace_digest(redis)
        same = now.digest == journal.redis_safety_copy.redis.digest
        print(f"  Redis {redis.describe()} now: {now.key_count} keys, "
              f"{'the same as' if same else 'NOT the same as'} its safety copy")
    if args.undo:
        if journal.phase not in ("commit", "undo", "mixed"):
            raise ConfigurationError(f"recovery {journal.recovery_id} is {journal.phase!r}: nothing to undo")
        _undo_recovery(journal, store, postgres, redis)
        journal.phase, journal.step = "rolled back", "undone by `runbooks recover-status --undo`"
        write_journal.fn(store, journal)
        print(f"recovery {journal.recovery_id}: every change put back. Maintenance mode is not switched by this "
              "command: check the application, then switch it off.")
    elif args.resolved:
        journal.phase, journal.step = "resolved", "settled by an operator"
        write_journal.fn(store, journal)
        print(f"recovery {journal.recovery_id} marked resolved")
    return 0


def _undo_recovery(journal: Any, store: Any, postgres: Any, redis: Any) -> None:
    """What phase 2's undo stack would have run, from the journal: databases, Redis, directories."""
    from tasks.databases import Swap, SwapPlan, maintenance_database, swap_out_databases
    from tasks.files import swap_out_directory
    from tasks.redis import restore_redis

    changed = [t for t in journal.targets if t.state in ("replaced", "undo failed")]
    if any(t.kind == "postgres" for t in changed):
        if postgres is None:
            raise ConfigurationError("the recovery renamed databases: give --postgres or $RUNBOOKS_POSTGRES_URL")
        swaps = [Swap(live=t.live, restored=t.beside, kept=t.kept) for t in changed if t.kind == "postgres"]
        with postgres.connect() as conn:
            involved = {n for s in swaps for n in (s.live, s.restored, s.kept)}
            plan = SwapPlan(swaps=swaps, maintenance_db=maintenance_database(conn, postgres.database, involved))
        swap_out_databases.fn(postgres, plan)
    if any(t.kind == "redis" for t in changed):
        if redis is None or journal.redis_safety_copy is None:
            raise ConfigurationError("the recovery replaced Redis: give --redis or $RUNBOOKS_REDIS_URL")
        restore_redis.fn(journal.redis_safety_copy, store, redis, flush_first=True)
    for t in (t for t in changed if t.kind == "files"):
        swap_out_directory.fn(t.beside, t.live, t.kept)
    for t in changed:
        if t.kind != "weaviate":
            t.state = "put back"
    weaviate_target = next((t for t in changed if t.kind == "weaviate"), None)
    if weaviate_target is not None:
        from blocks.weaviate import WeaviateConnection
        from tasks.store import find_set
        from tasks.weaviate import drop_collections

        part = find_set(store.get_client(), journal.set_id).part("weaviate")
        collections = part.weaviate.collections if part is not None and part.weaviate else []
        url = os.environ.get("RUNBOOKS_WEAVIATE_URL")
        if not url:
            raise ConfigurationError(f"the recovery restored the Weaviate collections {collections} into "
                                     f"{weaviate_target.live}: set $RUNBOOKS_WEAVIATE_URL (and "
                                     "$RUNBOOKS_WEAVIATE_API_KEY) to delete them, or delete them by hand; the other "
                                     "targets are put back")
        key = os.environ.get("RUNBOOKS_WEAVIATE_API_KEY")
        drop_collections.fn(WeaviateConnection(url=url, api_key=key), collections)
        weaviate_target.state = "put back"


def cmd_demo(_args: argparse.Namespace) -> int:
    from deployments.demo import run_demo

    return run_demo()


class _OneLinePerCommand(argparse.HelpFormatter):
    """`runbooks --help`: each command and its help on one line, whatever the terminal's width."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=160, max_help_position=40)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        # argparse measures the commands at their group's indent, not their own (2 deeper): leave room for that
        self._action_max_length = max(self._action_max_length, 22)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runbooks", description="Production runbooks as Prefect flows. `runbooks COMMAND --help` for one command.",
        formatter_class=_OneLinePerCommand)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    status = commands.add_parser("recover-status", help="a disaster recovery's journal and what exists now; "
                                                        "--undo puts back a dead recovery's changes")
    status.add_argument("id", nargs="?", default="latest", help="recovery id, flow run id, or 'latest'")
    status.add_argument("--store", help=store_help)
    status.add_argument("--postgres", help="Postgres Connection block name or password-less URL "
                                           "(default: $RUNBOOKS_POSTGRES_URL)")
    status.add_argument("--redis", help="Redis Connection block name or URL (default: $RUNBOOKS_REDIS_URL)")
    action = status.add_mutually_exclusive_group()
    action.add_argument("--undo", action="store_true", help="rename databases and directories back and reload "
                                                            "Redis from its safety copy")
    action.add_argument("--resolved", action="store_true", help="mark it settled (after fixing it by hand)")
    status.set_defaults(func=cmd_recover_status)

    demo = commands.add_parser("demo", help="back up a sandbox stack, restore it, and compare")
    demo.set_defaults(func=cmd_demo)
    # Listed here so `runbooks --help` names them; main() hands their argv to their module before parsing.
    for name, text in EXTERNAL_HELP.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


# Commands with their own argument parsing, in their own modules, imported only when used: the WAL
# commands run once per segment from PostgreSQL's archive_command and must not import Prefect.
EXTERNAL_COMMANDS = {
    "up": "deployments.serve",
    "sandbox": "deployments.sandbox_stack",
    "serve": "deployments.serve",
    "webhook": "deployments.webhook",
    "wal-push": "deployments.wal",
    "wal-fetch": "deployments.wal",
}
EXTERNAL_HELP = {
    "up": "the local stack: Prefect server and UI, every runbook served with its schedule, the webhook bridge",
    "sandbox": "`up` on throwaway PostgreSQL, Redis, store and S3 with seeded data and saved Blocks; to click in",
    "serve": "serve every runbook (schedules, Run buttons) against the Prefect API in $PREFECT_API_URL",
    "webhook": "the Alertmanager webhook bridge alone: alerts in, flow runs out",
    "wal-push": "archive one WAL segment to the store (PostgreSQL's archive_command)",
    "wal-fetch": "fetch one WAL segment from the store (PostgreSQL's restore_command)",
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
