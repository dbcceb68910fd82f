"""The `disaster-recovery` runbook's report: the `recovery-report` artifact (every target's state, every name
kept, what to do next) and the recovery time per step."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.manifest import Manifest
from tasks.recovery import Journal

_OUTCOME = {
    "prepare": "stopped while preparing: production was not changed",
    "prepare failed": "FAILED while preparing: production was not changed; the prepared copies were removed",
    "cancelled": "cancelled before any change: production was not changed; the prepared copies were removed",
    "commit": "stopped while changing production: see each target",
    "undo": "stopped while undoing: see each target",
    "recovered": "DONE: every target holds the backup set",
    "rolled back": "FAILED and undone: production is as it was before the run",
    "mixed": "FAILED and NOT fully undone: production is mixed, maintenance mode stays on",
    "resolved": "settled by an operator",
}


def write_report(journal: Journal, manifest: Manifest, mode: str, rto: dict[str, float],
                 restore_steps: dict[str, dict[str, float]]) -> None:
    """The recovery-report artifact: every target's state, every name kept, what to do next; and the
    recovery-rto table: seconds per component, each database's restore beside split into its steps."""
    if rto:
        rows = []
        for key, seconds in rto.items():
            rows.append({"step": key, "seconds": seconds})
            database = key.removeprefix("postgres:") if key.startswith("postgres:") else None
            rows += [{"step": f"  {name}", "seconds": part_seconds}
                     for name, part_seconds in restore_steps.get(database or "", {}).items()]
        create_table_artifact(rows, key="recovery-rto", description=f"Recovery time per step, set {manifest.set_id}")
    lines = [f"# Recovery `{journal.recovery_id}` from `{manifest.set_id}` ({mode})", "",
             f"**{_OUTCOME.get(journal.phase, journal.phase)}**", ""]
    if journal.error:
        lines += ["Error at: `" + journal.error.replace("`", "'") + "`", ""]  # as code: hosts are no mail links
    lines += ["| target | state | restored copy beside | replaced data kept as |", "|---|---|---|---|"]
    for t in journal.targets:
        lines.append(f"| {t.kind} `{t.live}` | {t.state} | {f'`{t.beside}`' if t.beside else '-'} | "
                     f"{f'`{t.kept}`' if t.kept and t.state in ('replaced', 'undo failed') else '-'} |")
    if journal.redis_safety_copy is not None:
        copy = journal.redis_safety_copy
        count, digest = (copy.redis.key_count, copy.redis.digest) if copy.redis else ("?", "?")
        lines += ["", f"Redis safety copy (the live keyspace before the swap): `{copy.key}` in the store, "
                  f"{count} keys, digest `{digest}`"]
    if journal.undone:
        lines += ["", "Undo steps:", *[f"- {u}" for u in journal.undone]]
    lines += ["", f"Maintenance mode: **{'ON' if journal.maintenance else 'off'}**", "",
              "Next: " + _next_steps(journal), "",
              f"Total measured time: {sum(rto.values()):.1f} s; journal: `recoveries/{journal.recovery_id}/`"]
    create_markdown_artifact("\n".join(lines), key="recovery-report")


def _next_steps(journal: Journal) -> str:
    if journal.phase == "recovered":
        return ("check the application; drop the replaced databases and directories listed above once you no "
                "longer need them (docs/disaster-recovery.md, 'Cleaning up').")
    if journal.phase in ("rolled back",):
        return ("production is as before. The restored copies stay beside under the names above: fix the cause "
                "and run again, or drop them (docs/disaster-recovery.md, 'Cleaning up').")
    if journal.phase in ("mixed", "commit", "undo"):
        return (f"run `runbooks recover-status {journal.recovery_id}` and follow docs/disaster-recovery.md, "
                "'A recovery that died': nothing is lost, every replaced database is kept and the Redis safety "
                "copy is in the store.")
    return "nothing to clean up."
