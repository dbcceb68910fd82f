"""The `disaster-recovery` runbook's approval: what the approver reads (the set, what each target becomes and
what happens to its current data, the parts) and the name they type."""

from __future__ import annotations

from datetime import UTC, datetime

from blocks.postgres import PostgresConnection
from blocks.redis import RedisConnection
from blocks.store import BackupStore
from tasks.approval import ApprovalForm, ask_approval
from tasks.manifest import Manifest, Part, human_size, set_time
from tasks.recovery import Journal, Target, safety_copy_key


def confirmation_name(targets: list[Target], postgres: PostgresConnection | None,
                      redis: RedisConnection | None) -> str:
    """What the approver types: the database's name when one database is replaced, else the server's host
    (PostgreSQL, else Redis), else the first live target (a directory, a Weaviate)."""
    databases = [t.live for t in targets if t.kind == "postgres"]
    if len(databases) == 1:
        return databases[0]
    if databases and postgres is not None:
        return postgres.host
    if any(t.kind == "redis" for t in targets) and redis is not None:
        return redis.host
    return next((t.live for t in targets if t.kind != "globals"), targets[0].live if targets else "recovery")


def ask_recovery_approval(manifest: Manifest, journal: Journal, parts: list[Part], mode: str,
                          keep_safety_copy: bool, store: BackupStore, timeout: int, name: str) -> ApprovalForm | None:
    age = datetime.now(UTC) - set_time(manifest.set_id)
    drops = mode == "in-place" and not keep_safety_copy
    lines = [
        f"## Restore backup set `{manifest.set_id}`?",
        "",
        f"- taken {manifest.completed_at:%Y-%m-%d %H:%M} UTC ({age.total_seconds() / 3600:.1f} h ago), "
        f"{human_size(manifest.size)} stored; every part downloaded and its sha256 checked",
        f"- mode: **{mode}**. Everything below is already restored beside production and verified; approving "
        "switches maintenance mode on and swaps it in, undoing every step if one fails.",
        "",
        "| target | now | becomes | the current data |",
        "|---|---|---|---|",
    ]
    for t in journal.targets:
        if t.kind == "postgres":
            fate = "**DROPPED** after success" if drops else f"kept as `{t.kept}`"
            lines.append(f"| database `{t.live}` | live | the copy restored as `{t.beside}` | {fate} |")
        elif t.kind == "globals":
            lines.append(f"| roles on `{t.live}` | live | missing roles created (already done) | unchanged |")
        elif t.kind == "redis":
            lines.append(f"| Redis `{t.live}` | live | emptied and loaded from the snapshot | saved first to "
                         f"`{store.describe()}/{safety_copy_key(journal.recovery_id)}` |")
        elif t.kind == "files":
            lines.append(f"| directory `{t.live}` | live | `{t.beside}` renamed in | kept as `{t.kept}` |")
        elif t.kind == "weaviate":
            lines.append(f"| Weaviate `{t.live}` | lacks the set's collections (checked) | collections restored "
                         "through its backup API | nothing is replaced; on failure they are deleted again |")
    lines += ["", "Nothing is dropped." if not drops else "The replaced databases are dropped once the recovery "
              "has succeeded (mode in-place, keep_safety_copy off).", "",
              "| part | size |", "|---|---|", *[f"| {p.kind}: `{p.name}` | {human_size(p.raw_size)} |" for p in parts]]
    lines += ["", f"To approve, choose **approve** and type `{name}` (the target) in the form."]
    return ask_approval("\n".join(lines), name, timeout)
