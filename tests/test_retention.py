"""Retention: the GFS policy as plain and property tests (hypothesis), the store steps against a real
directory and SeaweedFS, and `apply-retention` end to end on S3."""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from blocks.backends import LocalStore
from blocks.errors import ConfigurationError
from blocks.store import BackupStore, StoreClient
from tasks.manifest import (
    Part,
    Verification,
    build_manifest,
    manifest_key,
    new_set_id,
    part_key,
    set_time,
    verification_key,
)
from tasks.retention import (
    Decision,
    RetentionPolicy,
    RetentionRefused,
    SetInfo,
    bucket_rank,
    delete_set,
    deletion_order,
    gather_inventory,
    plan_retention,
)
from tasks.store import list_sets

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)


def _set(when: datetime, verified: bool | None = None, *, complete: bool = True, tag: str = "aaaaaa",
         last_modified: datetime | None = None) -> SetInfo:
    return SetInfo(set_id=new_set_id(when, entropy=tag), time=when, complete=complete, verified=verified,
                   size=100, last_modified=last_modified)


def _kept(decisions: list[Decision]) -> set[str]:
    return {d.set_id for d in decisions if d.keep}


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# ------------------------------------------------------------------------------------ plain unit tests


def test_policy_that_keeps_nothing_is_refused():
    with pytest.raises(ConfigurationError, match="keeps nothing"):
        RetentionPolicy(keep_last=0, daily=0, weekly=0, monthly=0, yearly=0)
    with pytest.raises(ConfigurationError, match="negative"):
        RetentionPolicy(daily=1, min_age=-H)


def test_naive_now_and_duplicate_ids_are_refused():
    policy = RetentionPolicy(daily=1)
    with pytest.raises(ConfigurationError, match="aware"):
        plan_retention([], policy, datetime(2026, 1, 1))
    one = _set(NOW - 48 * H)
    with pytest.raises(ConfigurationError, match="duplicate"):
        plan_retention([one, one], policy, NOW)


# The worked example of docs/retention.md (also the end-to-end history below).
EXAMPLE = {
    "A": (_at("2024-03-10T02:00"), True, True),
    "B": (_at("2025-06-01T02:00"), True, True),
    "C": (_at("2025-06-20T02:00"), None, True),
    "D": (_at("2025-07-02T02:00"), True, True),
    "E": (_at("2025-07-02T14:00"), None, True),
    "F": (_at("2025-07-03T02:00"), False, True),
    "G": (_at("2025-07-01T05:00"), None, False),
}
EXAMPLE_POLICY = RetentionPolicy(keep_last=1, daily=2, monthly=2, min_age=H, incomplete_grace=24 * H)


def test_worked_example():
    ids = {name: new_set_id(when, entropy=f"00000{i}") for i, (name, (when, _, _)) in enumerate(EXAMPLE.items())}
    sets = [SetInfo(set_id=ids[n], time=when, complete=complete, verified=verified)
            for n, (when, verified, complete) in EXAMPLE.items()]
    decisions = plan_retention(sets, EXAMPLE_POLICY, NOW)
    name = {v: k for k, v in ids.items()}
    assert [name[d.set_id] for d in decisions] == ["F", "E", "D", "G", "C", "B", "A"]
    assert {name[d.set_id]: d.keep for d in decisions} == {
        "F": True, "E": False, "D": True, "G": False, "C": False, "B": True, "A": False}
    reasons = {name[d.set_id]: d.reason for d in decisions}
    assert reasons["F"] == "last 1 of 1; daily 2025-07-03; newest set"
    assert reasons["D"] == "daily 2025-07-02; monthly 2025-07; newest verified set"
    assert reasons["B"] == "monthly 2025-06"
    assert reasons["E"] == f"daily 2025-07-02 is kept by {ids['D']}"
    assert reasons["C"] == f"monthly 2025-06 is kept by {ids['B']}"
    assert reasons["A"] == "outside the policy (1 last, 2 days, 2 months)"
    assert reasons["G"].startswith("no manifest, last written 509d 7h ago")


def test_bucket_prefers_passed_drill_then_never_drilled_then_failed():
    day = _at("2026-11-01T00:00")
    failed, never, passed = (_set(day + H * h, v, tag=f"00000{h}") for h, v in ((12, False), (8, None), (2, True)))
    assert max([failed, never, passed], key=bucket_rank) is passed
    assert max([failed, never], key=bucket_rank) is never
    kept = _kept(plan_retention([failed, never, passed], RetentionPolicy(daily=1, min_age=H), NOW))
    # The failed set stays only as the newest set; the day's representative is the one that passed.
    assert kept == {passed.set_id, failed.set_id}


def test_failing_drills_do_not_make_retention_delete_everything():
    """A broken drill server marks every set failed: the policy keeps what it would keep anyway."""
    times = [NOW - timedelta(days=d, hours=3) for d in range(40)]
    failed = [_set(t, False, tag=f"{i:06x}") for i, t in enumerate(times)]
    never = [_set(t, None, tag=f"{i:06x}") for i, t in enumerate(times)]
    policy = RetentionPolicy(daily=7, weekly=4)
    assert _kept(plan_retention(failed, policy, NOW)) == _kept(plan_retention(never, policy, NOW))
    assert len(_kept(plan_retention(failed, policy, NOW))) >= 7


def test_iso_week_spans_new_year():
    # 2026-12-31 (Thu) and 2027-01-02 (Sat) are both in ISO week 2026-W53.
    old, new = _set(_at("2026-12-31T02:00"), tag="000001"), _set(_at("2027-01-02T02:00"), tag="000002")
    decisions = plan_retention([old, new], RetentionPolicy(weekly=1, min_age=H), _at("2027-02-01T00:00"))
    assert _kept(decisions) == {new.set_id}
    assert "weekly 2026-W53" in decisions[0].reason


def test_incomplete_set_grace_counts_from_its_last_write():
    started = NOW - 72 * H
    stale = _set(started, complete=False, tag="000001", last_modified=started + H)
    running = _set(started, complete=False, tag="000002", last_modified=NOW - 2 * H)  # a long backup
    keeper = _set(NOW - 96 * H, tag="000003")
    decisions = plan_retention([stale, running, keeper], RetentionPolicy(keep_last=1, incomplete_grace=24 * H), NOW)
    assert _kept(decisions) == {running.set_id, keeper.set_id}


def test_protect_hook_adds_a_keep_reason():
    old = [_set(NOW - timedelta(days=d), tag=f"{d:06x}") for d in range(1, 6)]
    pitr = {old[-1].set_id}
    decisions = plan_retention(old, RetentionPolicy(keep_last=1), NOW,
                               protect=lambda s: "base of the PITR window" if s.set_id in pitr else None)
    assert _kept(decisions) == {old[0].set_id, old[-1].set_id}
    assert next(d for d in decisions if d.set_id in pitr).reason == "base of the PITR window"


def test_deletion_order_is_manifest_first_then_drill_record_then_parts():
    set_id = new_set_id(NOW, entropy="abcdef")
    other = new_set_id(NOW, entropy="000000")
    keys = [part_key(set_id, "redis"), verification_key(set_id), manifest_key(set_id),
            part_key(set_id, "postgres", "app"), manifest_key(other)]
    assert deletion_order(keys, set_id) == [manifest_key(set_id), verification_key(set_id),
                                            part_key(set_id, "postgres", "app"), part_key(set_id, "redis")]
    assert deletion_order([part_key(set_id, "redis")], set_id) == [part_key(set_id, "redis")]


# ------------------------------------------------------------------------------------ property tests


@st.composite
def histories(draw: st.DrawFn) -> tuple[datetime, list[SetInfo]]:
    now = draw(st.datetimes(min_value=datetime(2021, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)))
    # Minutes before now: clusters within days, spread over years, and a little clock skew (negative).
    offsets = draw(st.lists(st.one_of(st.integers(-90, 3 * 24 * 60), st.integers(0, 60 * 24 * 60),
                                      st.integers(0, 3 * 366 * 24 * 60)), max_size=40))
    sets = []
    for i, minutes in enumerate(offsets):
        when = now - timedelta(minutes=minutes)
        complete = draw(st.sampled_from([True, True, True, False]))
        idle = draw(st.none() | st.integers(0, 96 * 60))
        sets.append(SetInfo(
            set_id=new_set_id(when, entropy=f"{i:06x}"), time=when, complete=complete,
            verified=draw(st.sampled_from([True, False, None])), size=draw(st.integers(0, 10**9)),
            last_modified=None if idle is None else max(when, now - timedelta(minutes=idle)),
        ))
    return now, sets


@st.composite
def policies(draw: st.DrawFn) -> RetentionPolicy:
    counts = draw(st.lists(st.integers(0, 6), min_size=5, max_size=5))
    assume(any(counts))
    keep_last, daily, weekly, monthly, yearly = counts
    return RetentionPolicy(keep_last=keep_last, daily=daily, weekly=weekly, monthly=monthly, yearly=yearly,
                           min_age=timedelta(minutes=draw(st.integers(0, 96 * 60))),
                           incomplete_grace=timedelta(minutes=draw(st.integers(0, 96 * 60))))


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(histories(), policies())
def test_property_one_decision_per_set_newest_first(history, policy):
    now, sets = history
    decisions = plan_retention(sets, policy, now)
    by_id = {s.set_id: s for s in sets}
    assert sorted(d.set_id for d in decisions) == sorted(by_id)
    assert [by_id[d.set_id].time for d in decisions] == sorted((s.time for s in sets), reverse=True)
    assert all(d.reason and d.complete == by_id[d.set_id].complete for d in decisions)


@PROPERTY
@given(histories(), policies())
def test_property_never_deletes_the_newest_verified_set(history, policy):
    now, sets = history
    verified = [s for s in sets if s.complete and s.verified is True]
    assume(verified)
    newest = max(verified, key=lambda s: (s.time, s.set_id))
    assert newest.set_id in _kept(plan_retention(sets, policy, now))


@PROPERTY
@given(histories(), policies())
def test_property_never_leaves_zero_verified_sets(history, policy):
    now, sets = history
    kept = _kept(plan_retention(sets, policy, now))
    if any(s.complete and s.verified is True for s in sets):
        assert any(s.complete and s.verified is True and s.set_id in kept for s in sets)


@PROPERTY
@given(histories(), policies())
def test_property_never_deletes_a_set_younger_than_min_age(history, policy):
    now, sets = history
    kept = _kept(plan_retention(sets, policy, now))
    assert all(s.set_id in kept for s in sets if now - s.time < policy.min_age)


@PROPERTY
@given(histories(), policies())
def test_property_keeps_the_newest_sets_and_at_least_one(history, policy):
    now, sets = history
    kept = _kept(plan_retention(sets, policy, now))
    complete = sorted((s for s in sets if s.complete), key=lambda s: (s.time, s.set_id), reverse=True)
    assert all(s.set_id in kept for s in complete[: max(policy.keep_last, 1)])


@PROPERTY
@given(histories(), policies())
def test_property_gfs_keeps_the_best_set_of_each_of_the_newest_buckets(history, policy):
    now, sets = history
    kept = _kept(plan_retention(sets, policy, now))
    complete = [s for s in sets if s.complete]
    keys = {
        "daily": lambda t: t.date(),
        "weekly": lambda t: t.isocalendar()[:2],
        "monthly": lambda t: (t.year, t.month),
        "yearly": lambda t: t.year,
    }
    for label, key_of in keys.items():
        buckets: dict[object, list[SetInfo]] = {}
        for s in complete:
            buckets.setdefault(key_of(s.time), []).append(s)
        newest = sorted(buckets, reverse=True)[: getattr(policy, label)]
        for key in newest:
            best = max(buckets[key], key=lambda s: (s.verified is True, s.verified is not False, s.time, s.set_id))
            assert best.set_id in kept, (label, key)
        # A bucket's representative never failed its drill while another set of that bucket did not.
        for key in newest:
            if any(s.verified is not False for s in buckets[key]):
                assert any(s.set_id in kept and s.verified is not False for s in buckets[key])


@PROPERTY
@given(histories(), policies())
def test_property_incomplete_sets_go_exactly_after_grace_and_min_age(history, policy):
    now, sets = history
    kept = _kept(plan_retention(sets, policy, now))
    for s in sets:
        if not s.complete:
            idle = now - max(s.time, s.last_modified or s.time)
            expired = idle >= policy.incomplete_grace and now - s.time >= policy.min_age
            assert (s.set_id not in kept) == expired


@PROPERTY
@given(histories(), policies())
def test_property_plan_is_stable_when_run_again(history, policy):
    """Applying the plan and planning again deletes nothing more: retention runs are idempotent."""
    now, sets = history
    kept = _kept(plan_retention(sets, policy, now))
    again = plan_retention([s for s in sets if s.set_id in kept], policy, now)
    assert all(d.keep for d in again)


@PROPERTY
@given(histories(), policies(), st.sampled_from(["keep_last", "daily", "weekly", "monthly", "yearly"]))
def test_property_a_more_generous_policy_keeps_a_superset(history, policy, field):
    now, sets = history
    more = policy.model_copy(update={field: getattr(policy, field) + 2})
    assert _kept(plan_retention(sets, policy, now)) <= _kept(plan_retention(sets, more, now))


@PROPERTY
@given(histories(), policies())
def test_property_keeps_no_more_complete_sets_than_the_rules_allow(history, policy):
    now, sets = history
    decisions = plan_retention(sets, policy, now)
    young = sum(1 for s in sets if s.complete and now - s.time < policy.min_age)
    budget = policy.keep_last + policy.daily + policy.weekly + policy.monthly + policy.yearly + 2 + young
    assert sum(1 for d in decisions if d.keep and d.complete) <= budget


@PROPERTY
@given(histories(), policies(), st.data())
def test_property_protected_sets_are_never_deleted(history, policy, data):
    now, sets = history
    protected = {s.set_id for s in sets if data.draw(st.booleans())}
    kept = _kept(plan_retention(sets, policy, now, protect=lambda s: "PITR" if s.set_id in protected else None))
    assert protected <= kept


# ----------------------------------------------------------------------------- store steps (real I/O)


def _write_set(client: StoreClient, when: datetime, *, tag: str, verified: bool | None = None,
               complete: bool = True) -> tuple[str, set[str]]:
    """A small real set: two parts, then (complete) the manifest and (verified) a drill record."""
    set_id = new_set_id(when, entropy=tag)
    parts = []
    for kind, name in (("postgres", "app"), ("redis", "")):
        key = part_key(set_id, kind, name)
        data = f"{set_id} {kind} {name}".encode() * 10
        client.put_bytes(key, data)
        parts.append(Part(kind=kind, name=name or "redis", key=key, size=len(data), raw_size=len(data),
                          sha256=hashlib.sha256(data).hexdigest(), tool="test"))
    if complete:
        manifest = build_manifest(set_id, parts, started_at=when, completed_at=when, tags=["retention-test"],
                                  source={}, runbooks_version="test")
        client.put_bytes(manifest_key(set_id), manifest.to_bytes())
        if verified is not None:
            client.put_bytes(verification_key(set_id), Verification(
                set_id=set_id, verified_at=when + H, ok=verified).to_bytes())
    return set_id, {o.key for o in client.list(f"backups/{set_id}/")}


def test_inventory_reads_manifests_drill_records_and_leftovers(tmp_path):
    store = BackupStore.from_url(f"file://{tmp_path}")
    client = store.get_client()
    ok, _ = _write_set(client, NOW - 72 * H, tag="000001", verified=True)
    bad, _ = _write_set(client, NOW - 48 * H, tag="000002", verified=False)
    never, _ = _write_set(client, NOW - 24 * H, tag="000003")
    leftover, _ = _write_set(client, NOW - 12 * H, tag="000004", complete=False)
    client.put_bytes("backups/README", b"not a set")
    client.put_bytes("wal/000000010000000000000001.zst", b"not retention's business")
    inventory = gather_inventory.fn(store)
    assert [(s.set_id, s.complete, s.verified) for s in inventory.sets] == [
        (ok, True, True), (bad, True, False), (never, True, None), (leftover, False, None)]
    assert all(s.time == set_time(s.set_id) and s.size > 0 and s.last_modified for s in inventory.sets)
    assert inventory.sets[0].size == sum(o.size for o in client.list(f"backups/{ok}/"))


def test_interrupted_delete_never_leaves_a_listed_set_and_the_next_run_finishes(tmp_path, monkeypatch):
    store = BackupStore.from_url(f"file://{tmp_path}")
    client = store.get_client()
    keep, keep_keys = _write_set(client, NOW - 24 * H, tag="000001", verified=True)
    doomed, _ = _write_set(client, NOW - 48 * H, tag="000002", verified=True)
    real_delete = LocalStore.delete
    calls = []

    def dies_after_first(self: LocalStore, key: str) -> None:
        calls.append(key)
        if len(calls) > 1:
            raise OSError("store went away")
        real_delete(self, key)

    monkeypatch.setattr(LocalStore, "delete", dies_after_first)
    with pytest.raises(OSError):
        delete_set.fn(store, doomed, complete=True)
    monkeypatch.undo()
    assert calls[0] == manifest_key(doomed)
    assert [m.set_id for m in list_sets(client)] == [keep]  # never listed with missing parts
    leftover = next(s for s in gather_inventory.fn(store).sets if s.set_id == doomed)
    assert not leftover.complete  # the next run sees leftovers of a set: deleted after the grace
    later = datetime.now(UTC) + 2 * H  # its objects were written just now: past the grace only later
    plan = plan_retention(gather_inventory.fn(store).sets, RetentionPolicy(keep_last=1, incomplete_grace=H), later)
    assert [d.set_id for d in plan if not d.keep] == [doomed]
    assert delete_set.fn(store, doomed, complete=False).objects == 3
    assert {o.key for o in client.list()} == keep_keys
    assert delete_set.fn(store, doomed, complete=False).objects == 0  # repeatable


def test_delete_refuses_leftovers_that_got_a_manifest_since_the_plan(tmp_path):
    store = BackupStore.from_url(f"file://{tmp_path}")
    set_id, keys = _write_set(store.get_client(), NOW - 48 * H, tag="000001")
    with pytest.raises(RetentionRefused, match="has a manifest now"):
        delete_set.fn(store, set_id, complete=False)
    assert {o.key for o in store.get_client().list()} == keys
    with pytest.raises(ConfigurationError, match="not a backup set id"):
        delete_set.fn(store, "../etc", complete=True)


def test_local_abort_uploads_older_than_spares_fresh_writes(tmp_path):
    client = LocalStore(tmp_path)
    (tmp_path / "backups/x").mkdir(parents=True)
    stale, fresh = tmp_path / "backups/x/a.dump.zst.partial-1", tmp_path / "backups/x/b.dump.zst.partial-2"
    stale.write_bytes(b"a")
    fresh.write_bytes(b"b")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    assert client.abort_incomplete_uploads("backups/", older_than=timedelta(minutes=30)) == 1
    assert not stale.exists() and fresh.exists()
    assert client.abort_incomplete_uploads("backups/") == 1  # without older_than: every one, as before
    assert not fresh.exists()


def test_s3_abort_uploads_older_than_spares_fresh_uploads(s3):
    from tests.test_backup_e2e import _s3_store

    prefix = f"abort-{time.time_ns()}"
    client = _s3_store(s3, prefix).get_client()
    raw = client.client  # boto3: start uploads the way an interrupted backup leaves them
    raw.create_multipart_upload(Bucket=s3.bucket, Key=f"{prefix}/backups/old/a.dump.zst")
    time.sleep(2.5)
    raw.create_multipart_upload(Bucket=s3.bucket, Key=f"{prefix}/backups/new/b.dump.zst")
    assert client.abort_incomplete_uploads("backups/", older_than=timedelta(seconds=1.5)) == 1
    left = raw.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix).get("Uploads", [])
    assert [u["Key"] for u in left] == [f"{prefix}/backups/new/b.dump.zst"]
    assert client.abort_incomplete_uploads("backups/") == 1


# --------------------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_apply_retention_on_s3_deletes_exactly_the_planned_sets(s3, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.retention import apply_retention
    from tests.test_backup_e2e import _s3_store

    prefix = f"retention-{time.time_ns()}"
    store = _s3_store(s3, prefix)
    client = store.get_client()
    written: dict[str, tuple[str, set[str]]] = {}
    for i, (name, (when, verified, complete)) in enumerate(EXAMPLE.items()):
        written[name] = _write_set(client, when, tag=f"00000{i}", verified=verified, complete=complete)
    written["H"] = _write_set(client, datetime.now(UTC) - timedelta(minutes=1), tag="000009", complete=False)
    client.put_bytes("backups/README", b"not a set: never touched")
    client.put_bytes("wal/000000010000000000000001.zst", b"PITR's business: never touched")
    stale_key = f"{prefix}/backups/{written['G'][0]}/files/media.tar.zst"
    client.client.create_multipart_upload(Bucket=s3.bucket, Key=stale_key)
    time.sleep(3)  # the upload and every object written above are now older than the 2 s grace
    sizes = {o.key: o.size for o in client.list()}
    before = set(sizes)
    policy = {"keep_last": 1, "daily": 2, "weekly": 0, "monthly": 2, "yearly": 0,
              "min_age_hours": 1, "incomplete_grace_hours": 2 / 3600}
    ids = {name: set_id for name, (set_id, _) in written.items()}

    plan = apply_retention(store=store, **policy)  # dry_run is the default
    assert plan.dry_run and plan.deleted == [] and plan.aborted_uploads is None
    assert plan.planned == [ids[n] for n in ("E", "G", "C", "A")]
    assert {o.key for o in client.list()} == before

    state = apply_retention(store=store, **policy, dry_run=False, return_state=True)
    result = state.result()
    assert result.deleted == plan.planned and result.kept == [ids[n] for n in ("H", "F", "D", "B")]
    kept_keys = set().union(*(written[n][1] for n in ("F", "D", "B", "H")))
    assert {o.key for o in client.list()} == kept_keys | {"backups/README", "wal/000000010000000000000001.zst"}
    assert result.deleted_bytes == sum(sizes[k] for n in ("E", "G", "C", "A") for k in written[n][1])
    assert [m.set_id for m in list_sets(client)] == [ids[n] for n in ("B", "D", "F")]
    assert result.aborted_uploads == 1
    assert client.client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix).get("Uploads", []) == []

    with get_client(sync_client=True) as api:
        artifacts = api.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    table = next(a for a in artifacts if a.key == "retention-plan")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["set"]: r["decision"] for r in rows} == {
        **{ids[n]: "DELETE" for n in ("E", "G", "C", "A")}, **{ids[n]: "keep" for n in ("H", "F", "D", "B")}}
    assert any(a.key == "retention-summary" and "4 sets deleted" in a.data for a in artifacts)

    again = apply_retention(store=store, **policy, dry_run=False)
    assert again.planned == [] and again.deleted == []


@pytest.mark.e2e
def test_apply_retention_refuses_a_policy_that_keeps_nothing(prefect_harness, tmp_path):
    from flows.retention import apply_retention

    store = BackupStore.from_url(f"file://{tmp_path}")
    _, keys = _write_set(store.get_client(), NOW - 480 * H, tag="000001", verified=True)
    with pytest.raises(ConfigurationError, match="keeps nothing"):
        apply_retention(store=store, keep_last=0, daily=0, weekly=0, monthly=0, yearly=0, dry_run=False)
    assert {o.key for o in store.get_client().list()} == keys
