"""The journal of a recovery: what each target is now, written to the store at every change, so a
recovery whose process died (kill -9, a lost node) can be found and finished or undone by hand.

``recoveries/<recovery id>/journal.json`` in the backup store; the Redis safety copy sits beside it.
Retention only looks under ``backups/``, so it never removes either.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import ClassVar, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from blocks.errors import ConfigurationError
from blocks.store import BackupStore, StoreClient
from tasks.manifest import JsonRecord, Part
from tasks.retry import retry_transient

RECOVERIES_PREFIX = "recoveries/"
JOURNAL_NAME = "journal.json"

Phase = Literal["prepare", "prepare failed", "cancelled", "commit", "undo", "recovered", "rolled back", "mixed",
                "resolved"]
TargetState = Literal["untouched", "prepared", "replaced", "put back", "undo failed"]


def journal_key(recovery_id: str) -> str:
    return f"{RECOVERIES_PREFIX}{recovery_id}/{JOURNAL_NAME}"


def safety_copy_key(recovery_id: str, name: str = "redis") -> str:
    return f"{RECOVERIES_PREFIX}{recovery_id}/{name}-safety.rdb.zst"


class Target(BaseModel):
    """One production target of a recovery and every name involved in it."""

    kind: Literal["postgres", "globals", "redis", "files", "weaviate"]
    source: str = Field(default="", description="The part's name in the set.")
    live: str = Field(description="The production name: database, Redis address or directory.")
    beside: str = Field(default="", description="Where the restored copy was prepared.")
    kept: str = Field(default="", description="Where the data it replaced is kept once swapped.")
    state: TargetState = "untouched"


class Journal(JsonRecord):
    _what: ClassVar[str] = "recovery journal"

    recovery_id: str
    set_id: str
    flow_run_id: str | None = None
    server: dict[str, str] = Field(default_factory=dict, description="postgres / redis: where (no password).")
    started_at: datetime
    updated_at: datetime
    phase: Phase = "prepare"
    step: str = Field(default="", description="The step under way (or the last one, once the phase ended).")
    maintenance: bool = Field(default=False, description="Maintenance mode is on because of this recovery.")
    targets: list[Target] = Field(default_factory=list)
    redis_safety_copy: Part | None = None
    undone: list[str] = Field(default_factory=list, description="Undo steps that ran, with their outcome.")
    error: str = ""

    def target(self, kind: str, source: str) -> Target:
        """The target of the set's part ``kind``/``source``."""
        for target in self.targets:
            if target.kind == kind and target.source == source:
                return target
        raise KeyError(f"{kind}:{source}")

    def mark(self, state: TargetState, *kinds: str) -> None:
        for target in self.targets:
            if target.kind in kinds:
                target.state = state


@task(retries=3, retry_delay_seconds=2, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def write_journal(store: BackupStore, journal: Journal) -> None:
    """Record the recovery's state (replacing the previous record)."""
    journal.updated_at = datetime.now(UTC)
    store.get_client().put_bytes(journal_key(journal.recovery_id), journal.to_bytes(), overwrite=True)


def read_journals(client: StoreClient) -> list[Journal]:
    """Every recovery journal in the store, oldest first."""
    keys = sorted(o.key for o in client.list(RECOVERIES_PREFIX) if o.key.endswith("/" + JOURNAL_NAME))
    return [Journal.from_bytes(client.get_bytes(k), where=f"{client.description}/{k}") for k in keys]


def read_journal(client: StoreClient, recovery_id: str) -> Journal:
    journals = read_journals(client)
    if recovery_id == "latest":
        if not journals:
            raise ConfigurationError(f"no recovery journal in {client.description}")
        return journals[-1]
    for journal in journals:
        if journal.recovery_id == recovery_id or journal.flow_run_id == recovery_id:
            return journal
    raise ConfigurationError(f"no recovery {recovery_id!r} in {client.description}; it has "
                             f"{[j.recovery_id for j in journals][-5:]}")


def unfinished(journals: list[Journal], lives: set[str]) -> list[Journal]:
    """Journals of recoveries that stopped in the middle of changing one of ``lives``: production may be
    mixed, so no new recovery of those targets may start before an operator looked."""
    return [j for j in journals if j.phase in ("commit", "undo", "mixed")
            and any(t.live in lives and t.state != "untouched" for t in j.targets)]


@task(retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def find_unfinished_recoveries(store: BackupStore, lives: set[str]) -> list[Journal]:
    """``unfinished`` over the store's journals: recoveries of ``lives`` that stopped while changing them."""
    return unfinished(read_journals(store.get_client()), lives)


def describe(journal: Journal) -> str:
    """The journal as the few lines an operator needs (the CLI and the flow's error text use it)."""
    lines = [f"recovery {journal.recovery_id} of set {journal.set_id}: phase {journal.phase}"
             f" (last update {journal.updated_at:%Y-%m-%d %H:%M:%S} UTC)"
             + (", maintenance mode ON" if journal.maintenance else "")]
    for t in journal.targets:
        names = ", ".join(f"{label} {value!r}" for label, value in (("beside", t.beside), ("kept", t.kept)) if value)
        lines.append(f"  {t.kind} {t.live!r}: {t.state}" + (f" ({names})" if names else ""))
    if journal.redis_safety_copy is not None:
        copy = journal.redis_safety_copy
        lines.append(f"  Redis safety copy: {copy.key} ({copy.redis.key_count if copy.redis else '?'} keys, "
                     f"digest {copy.redis.digest[:16] if copy.redis else '?'}...)")
    if journal.error:
        lines.append(f"  error: {journal.error}")
    return "\n".join(lines)
