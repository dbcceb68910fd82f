"""Retention: which backup sets a GFS policy keeps (pure, no I/O), and the store steps that apply it.

`plan_retention` decides over a plain list of `SetInfo`; the tasks below read that list from a store,
delete one set, and abort stale multipart uploads. Only keys under ``backups/<set id>/`` are touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from blocks.errors import ConfigurationError, RunbookError
from blocks.store import BackupStore, StoredObject
from tasks.log import run_logger
from tasks.manifest import (
    SETS_PREFIX,
    complete_set_ids,
    human_size,
    incomplete_set_ids,
    is_set_id,
    manifest_key,
    set_prefix,
    set_time,
    verification_key,
)
from tasks.retry import retry_transient
from tasks.store import read_manifest, read_verification


class RetentionRefused(RunbookError):
    """The plan or the store is not in a state where deleting is safe; nothing more was deleted."""


# ---------------------------------------------------------------------------------------------- models


class SetInfo(BaseModel):
    """What retention needs to know about one set (complete or not)."""

    model_config = ConfigDict(frozen=True)

    set_id: str
    time: AwareDatetime = Field(description="When the set was started (from its id).")
    complete: bool = Field(description="Has a manifest; without one it is leftover parts of a failed run.")
    verified: bool | None = Field(
        default=None, description="Last restore drill: True passed, False failed, None never drilled."
    )
    size: int = Field(default=0, description="Stored bytes under the set's prefix.")
    last_modified: AwareDatetime | None = Field(
        default=None, description="Newest object under the prefix; an incomplete set's grace counts from here."
    )

    @property
    def is_verified(self) -> bool:
        """Restorable as proven by a drill: only a complete set can be."""
        return self.complete and self.verified is True


class RetentionPolicy(BaseModel):
    """Grandfather-father-son counts plus the two safety ages. At least one count must be above zero."""

    model_config = ConfigDict(frozen=True)

    keep_last: int = Field(default=0, ge=0, description="The newest N complete sets.")
    daily: int = Field(default=0, ge=0, description="One set for each of the newest N days (UTC) with a set.")
    weekly: int = Field(default=0, ge=0, description="... ISO weeks (UTC).")
    monthly: int = Field(default=0, ge=0, description="... calendar months (UTC).")
    yearly: int = Field(default=0, ge=0, description="... calendar years (UTC).")
    min_age: timedelta = Field(default=timedelta(hours=24), description="No set younger than this is deleted.")
    incomplete_grace: timedelta = Field(
        default=timedelta(hours=24),
        description="A set without manifest is deleted once nothing was written to it for this long.",
    )

    @model_validator(mode="after")
    def _keeps_something(self) -> RetentionPolicy:
        if not (self.keep_last or self.daily or self.weekly or self.monthly or self.yearly):
            # Raised as ConfigurationError (not ValueError) so it is never mistaken for a transient error.
            raise ConfigurationError(
                "retention policy keeps nothing: keep_last, daily, weekly, monthly and yearly are all 0; "
                "set at least one (nothing was deleted)"
            )
        if self.min_age < timedelta(0) or self.incomplete_grace < timedelta(0):
            raise ConfigurationError("min_age and incomplete_grace cannot be negative")
        return self

    def describe(self) -> str:
        counts = [(self.keep_last, "last"), (self.daily, "days"), (self.weekly, "weeks"),
                  (self.monthly, "months"), (self.yearly, "years")]
        kept = ", ".join(f"{n} {what}" for n, what in counts if n)
        return (f"{kept}; min age {_duration(self.min_age)}, "
                f"incomplete grace {_duration(self.incomplete_grace)}")


class Decision(BaseModel):
    """Keep or delete one set, and why (every rule that keeps it, or why none does)."""

    model_config = ConfigDict(frozen=True)

    set_id: str
    keep: bool
    reason: str
    complete: bool


# ---------------------------------------------------------------------------------------- the policy

# A protect hook gives a reason to keep a set (e.g. "base backup of the PITR window") or None.
ProtectHook = Callable[[SetInfo], str | None]

_BUCKETS: tuple[tuple[str, Callable[[datetime], tuple[int, ...]], Callable[[tuple[int, ...]], str]], ...] = (
    ("daily", lambda t: (t.year, t.month, t.day), lambda k: f"{k[0]:04d}-{k[1]:02d}-{k[2]:02d}"),
    ("weekly", lambda t: tuple(t.isocalendar())[:2], lambda k: f"{k[0]:04d}-W{k[1]:02d}"),
    ("monthly", lambda t: (t.year, t.month), lambda k: f"{k[0]:04d}-{k[1]:02d}"),
    ("yearly", lambda t: (t.year,), lambda k: f"{k[0]:04d}"),
)
_DRILL_RANK = {True: 2, None: 1, False: 0}


def bucket_rank(info: SetInfo) -> tuple[int, datetime, str]:
    """Which set of a day/week/month/year represents it: passed drill > never drilled > failed drill,
    then the newest."""
    return (_DRILL_RANK[info.verified], info.time, info.set_id)


def plan_retention(
    sets: Iterable[SetInfo],
    policy: RetentionPolicy,
    now: datetime,
    *,
    protect: ProtectHook | None = None,
) -> list[Decision]:
    """One decision per set, newest first.

    A complete set is kept when any rule picks it: the newest ``keep_last``; the representative
    (`bucket_rank`) of each of the newest ``daily``/``weekly``/``monthly``/``yearly`` buckets that hold a
    set; the newest set; the newest verified set; younger than ``min_age``; ``protect``. An incomplete set
    is kept while younger than ``min_age``, within ``incomplete_grace`` of its last write, or protected.
    """
    if now.tzinfo is None:
        raise ConfigurationError("plan_retention needs an aware 'now' (UTC)")
    infos = sorted(sets, key=lambda s: (s.time, s.set_id), reverse=True)
    ids = [s.set_id for s in infos]
    if len(set(ids)) != len(ids):
        raise ConfigurationError(f"duplicate set ids in the inventory: {sorted({i for i in ids if ids.count(i) > 1})}")
    keep: dict[str, list[str]] = {s.set_id: [] for s in infos}
    complete = [s for s in infos if s.complete]

    for position, info in enumerate(complete[: policy.keep_last], start=1):
        keep[info.set_id].append(f"last {position} of {policy.keep_last}")
    winners: dict[str, dict[tuple[int, ...], str]] = {}
    for label, key_of, text in _BUCKETS:
        count = getattr(policy, label)
        if not count:
            continue
        buckets: dict[tuple[int, ...], list[SetInfo]] = {}
        for info in complete:
            buckets.setdefault(key_of(info.time.astimezone(UTC)), []).append(info)
        winners[label] = {}
        for key in sorted(buckets, reverse=True)[:count]:
            best = max(buckets[key], key=bucket_rank)
            winners[label][key] = best.set_id
            keep[best.set_id].append(f"{label} {text(key)}")
    if complete:
        keep[complete[0].set_id].append("newest set")
    newest_verified = next((s for s in complete if s.is_verified), None)
    if newest_verified is not None:
        keep[newest_verified.set_id].append("newest verified set")

    for info in infos:
        age = now - info.time
        if age < policy.min_age:
            keep[info.set_id].append(f"younger than min_age ({_duration(age)} old)")
        if not info.complete:
            idle = now - max(info.time, info.last_modified or info.time)
            if idle < policy.incomplete_grace:
                keep[info.set_id].append(f"no manifest, last written {_duration(idle)} ago: within grace")
        if protect is not None:
            extra = protect(info)
            if extra:
                keep[info.set_id].append(extra)

    decisions = []
    for info in infos:
        reasons = keep[info.set_id]
        if reasons:
            reason = "; ".join(reasons)
        elif info.complete:
            reason = _why_not(info, policy, winners)
        else:
            idle = now - max(info.time, info.last_modified or info.time)
            reason = f"no manifest, last written {_duration(idle)} ago (grace {_duration(policy.incomplete_grace)})"
        decisions.append(Decision(set_id=info.set_id, keep=bool(reasons), reason=reason, complete=info.complete))

    if complete and not any(d.keep for d in decisions if d.complete):  # unreachable by construction; a guard
        raise RetentionRefused("retention plan keeps no complete set; refusing to delete anything")
    return decisions


def _why_not(info: SetInfo, policy: RetentionPolicy, winners: dict[str, dict[tuple[int, ...], str]]) -> str:
    for label, key_of, text in _BUCKETS:
        winner = winners.get(label, {}).get(key_of(info.time.astimezone(UTC)))
        if winner is not None:
            return f"{label} {text(key_of(info.time.astimezone(UTC)))} is kept by {winner}"
    counts = [(policy.keep_last, "last"), (policy.daily, "days"), (policy.weekly, "weeks"),
              (policy.monthly, "months"), (policy.yearly, "years")]
    return "outside the policy (" + ", ".join(f"{n} {what}" for n, what in counts if n) + ")"


def deletion_order(keys: Iterable[str], set_id: str) -> list[str]:
    """The order to delete a set's objects in: the manifest FIRST, so the set stops being listed (and can
    no longer be picked for a restore) before any part goes; then the verification record; then the parts.

    The reverse of the write order (parts, then the manifest last). An interrupted delete leaves an
    unlisted incomplete set, which the next run removes; never a listed set with missing parts.
    """
    prefix = set_prefix(set_id)
    mine = sorted({k for k in keys if k.startswith(prefix)})
    first = [k for k in (manifest_key(set_id), verification_key(set_id)) if k in mine]
    return first + [k for k in mine if k not in first]


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days}d {hours}h" if hours else f"{sign}{days}d"
    if hours:
        return f"{sign}{hours}h {minutes}m"
    if minutes:
        return f"{sign}{minutes}m"
    return f"{sign}{secs}s"


# ----------------------------------------------------------------------------------------- the tasks


class Inventory(BaseModel):
    """Every set under ``backups/`` of a store, complete or not, oldest first."""

    store: str
    sets: list[SetInfo]


class DeletedSet(BaseModel):
    set_id: str
    objects: int
    bytes: int


@task(retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE)
def gather_inventory(store: BackupStore) -> Inventory:
    """List the store once; read each set's manifest (it must parse) and its drill record."""
    client = store.get_client()
    objects = client.list(SETS_PREFIX)
    keys = [o.key for o in objects]
    key_set = set(keys)
    by_set: dict[str, list[StoredObject]] = {}
    for obj in objects:
        by_set.setdefault(obj.key[len(SETS_PREFIX):].split("/", 1)[0], []).append(obj)

    sets: list[SetInfo] = []
    for set_id in complete_set_ids(keys):
        read_manifest(client, set_id)  # a manifest that does not parse stops the run before any delete
        record = read_verification(client, set_id, keys=key_set)
        verified = record.ok if record is not None else None
        sets.append(_set_info(set_id, by_set[set_id], complete=True, verified=verified))
    for set_id in incomplete_set_ids(keys):
        sets.append(_set_info(set_id, by_set[set_id], complete=False, verified=None))
    sets.sort(key=lambda s: (s.time, s.set_id))
    run_logger().info("inventory of %s: %d complete sets (%d verified), %d without manifest",
                      client.description, sum(s.complete for s in sets), sum(s.is_verified for s in sets),
                      sum(not s.complete for s in sets))
    return Inventory(store=client.description, sets=sets)


def _set_info(set_id: str, objects: list[StoredObject], *, complete: bool, verified: bool | None) -> SetInfo:
    return SetInfo(set_id=set_id, time=set_time(set_id), complete=complete, verified=verified,
                   size=sum(o.size for o in objects), last_modified=max(o.modified for o in objects))


def _worth_retrying(_task: object, _task_run: object, state: State) -> bool:
    """Store errors may pass; a refusal gives the same answer every time."""
    return not isinstance(state.result(raise_on_failure=False), RetentionRefused | ConfigurationError)


@task(retries=3, retry_delay_seconds=[2, 5, 10], retry_condition_fn=_worth_retrying, cache_policy=NO_CACHE,
      task_run_name="delete-set-{set_id}")
def delete_set(store: BackupStore, set_id: str, *, complete: bool) -> DeletedSet:
    """Delete every object of one set, manifest first (`deletion_order`). Safe to repeat after a crash.

    ``complete=False`` (leftovers of a failed run): refuses if a manifest has appeared since the plan.
    """
    if not is_set_id(set_id):
        raise ConfigurationError(f"{set_id!r} is not a backup set id; nothing deleted")
    client = store.get_client()
    objects = {o.key: o.size for o in client.list(set_prefix(set_id))}
    if not complete and manifest_key(set_id) in objects:
        raise RetentionRefused(
            f"set {set_id} in {client.description} has a manifest now but had none when the plan was made "
            "(a backup running longer than incomplete_grace?); it was not deleted"
        )
    order = deletion_order(objects, set_id)
    for key in order:
        client.delete(key)
    freed = sum(objects.values())
    run_logger().info("deleted %s set %s from %s: %d objects, %s", "backup" if complete else "incomplete",
                      set_id, client.description, len(order), human_size(freed))
    return DeletedSet(set_id=set_id, objects=len(order), bytes=freed)


@task(retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE)
def abort_stale_uploads(store: BackupStore, older_than: timedelta) -> int:
    """Abort unfinished uploads under ``backups/`` started more than ``older_than`` ago (S3 multipart
    uploads; local: temporary files), which cost storage and are never listed."""
    client = store.get_client()
    aborted = client.abort_incomplete_uploads(SETS_PREFIX, older_than=older_than)
    run_logger().info("aborted %d unfinished uploads older than %s in %s", aborted, _duration(older_than),
                      client.description)
    return aborted


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def physical_backup_ids(store: BackupStore) -> list[str]:
    """Sets that are PITR base backups: the PITR policy (``expire_pitr_backups``) decides about those."""
    from tasks.pitr.planning import base_backups

    return [m.set_id for m in base_backups(store.get_client())]
