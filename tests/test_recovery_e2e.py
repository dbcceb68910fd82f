"""`disaster-recovery` and `verify-backup` end to end: real PostgreSQL, Redis, SeaweedFS S3, a real HTTP app."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from blocks.app import AppEndpoint
from blocks.postgres import PostgresConnection
from blocks.redis import RedisConnection
from blocks.store import BackupStore
from deployments.cli import main as cli_main
from flows.backup import backup
from flows.disaster_recovery import disaster_recovery
from flows.verify import verify_backup
from tasks.files import tree_digest
from tasks.manifest import Manifest, manifest_key
from tasks.pg_checksums import collect_checksums
from tasks.redis import keyspace_digest
from tasks.store import read_verification
from tests.app_fixture import FakeApp

pytestmark = pytest.mark.e2e
TOKEN = "app-maintenance-token"


@pytest.fixture
def stack(pg, scratch_redis, tmp_path):
    """A live 'production': a database on the shared cluster, a Redis, a media directory, the app."""
    db = f"shop_{uuid.uuid4().hex[:8]}"
    conn = PostgresConnection.from_url(pg.url)
    with conn.connect(autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db}"')
    with conn.connect(db, autocommit=True) as c:
        c.execute("""
            CREATE TABLE orders (id bigserial PRIMARY KEY, customer text, total numeric(10,2), items jsonb);
            INSERT INTO orders (customer, total, items)
            SELECT 'c' || g, g / 4.0, jsonb_build_array(g, md5(g::text)) FROM generate_series(1, 20000) g;
            CREATE TABLE customers AS SELECT g AS id, 'name ' || g AS name FROM generate_series(1, 3000) g;
        """)
    rconn = RedisConnection.from_url(scratch_redis.url)
    client = rconn.get_client()
    for i in range(300):
        client.set(f"session:{i}", f"user{i}")
    client.hset("cart:1", mapping={"sku": "A", "qty": "2"})
    media = tmp_path / "media"
    (media / "img").mkdir(parents=True)
    for i in range(4):
        (media / "img" / f"{i}.png").write_bytes(bytes([i]) * 4096)
    app_db_url = pg.url.rsplit("/", 1)[0] + f"/{db}"
    with FakeApp(app_db_url, TOKEN) as app:
        endpoint = AppEndpoint(base_url=app.base_url, auth_value=SecretStr(f"Bearer {TOKEN}"))
        yield {"pg": conn, "db": db, "redis": rconn, "media": media, "app": app, "endpoint": endpoint}


def _snapshot(s) -> tuple:
    with s["pg"].connect(s["db"]) as c:
        tables = collect_checksums(c)
    return tables, keyspace_digest(s["redis"]), tree_digest(s["media"])


def _backup(s, store: BackupStore) -> str:
    return backup(store=store, postgres=s["pg"], databases=[s["db"]], include_globals=False, redis=s["redis"],
                  paths=[str(s["media"])], retries=0).set_id


def _damage(s) -> None:
    with s["pg"].connect(s["db"], autocommit=True) as c:
        c.execute("DROP TABLE customers")
        c.execute("UPDATE orders SET total = 0 WHERE id % 3 = 0")
    s["redis"].get_client().flushall()
    (s["media"] / "img" / "0.png").write_bytes(b"overwritten")


def _databases(s) -> list[str]:
    with s["pg"].connect() as c:
        return [r[0] for r in c.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                        (s["db"] + "%",))]


def _s3_store(s3) -> BackupStore:
    return BackupStore(backend="s3", bucket=s3.bucket, prefix=f"dr-{uuid.uuid4().hex[:8]}",
                       endpoint_url=s3.endpoint_url, region=s3.region, access_key_id=SecretStr(s3.access_key),
                       secret_access_key=SecretStr(s3.secret_key))


def test_recovery_restores_the_snapshot_and_keeps_the_damaged_data(stack, s3, prefect_harness):
    store = _s3_store(s3)
    good = _snapshot(stack)
    set_id = _backup(stack, store)
    _damage(stack)
    damaged = _snapshot(stack)
    assert damaged != good

    result = disaster_recovery(store=store, backup_id=set_id, postgres=stack["pg"], redis=stack["redis"],
                               app=stack["endpoint"], confirm=True)

    assert _snapshot(stack) == good
    kept = result.kept[f"postgres:{stack['db']}"]
    assert kept.startswith(f"{stack['db']}__pre_restore_") and kept in _databases(stack)
    with stack["pg"].connect(kept) as c:
        assert collect_checksums(c) == damaged[0]  # the damaged database is intact, renamed
    assert Path(result.kept[f"files:{stack['media']}"]).is_dir()
    assert [e for e, _ in stack["app"].events] == ["on", "off"]
    assert stack["app"].unauthorized == 0
    assert set(result.rto_seconds) >= {"download + verify", f"postgres:{stack['db']}", "database swap", "redis",
                                       "health check"}


def test_flipped_byte_fails_before_anything_changes(stack, prefect_harness, tmp_path):
    store = BackupStore.from_url(f"file://{tmp_path}/store")
    set_id = _backup(stack, store)
    _damage(stack)
    before = _snapshot(stack)
    manifest = Manifest.from_bytes((tmp_path / "store" / manifest_key(set_id)).read_bytes())
    part = manifest.part("postgres")
    stored = tmp_path / "store" / part.key
    data = bytearray(stored.read_bytes())
    data[len(data) // 3] ^= 0x01
    stored.write_bytes(bytes(data))

    state = disaster_recovery(store=store, backup_id=set_id, postgres=stack["pg"], redis=stack["redis"],
                              app=stack["endpoint"], confirm=True, return_state=True)
    assert state.is_failed()
    assert "sha256" in str(state.result(raise_on_failure=False))
    assert _snapshot(stack) == before
    assert _databases(stack) == [stack["db"]]
    assert stack["app"].events == []  # maintenance mode never switched on


def _run_in_thread(**kwargs):
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("state", disaster_recovery(**kwargs,
                                                                                       return_state=True)))
    thread.start()
    return thread, box


def _wait_for_paused(flow_name: str = "disaster-recovery", timeout: float = 60):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            if runs:
                return runs[0]
            time.sleep(0.5)
    raise AssertionError("no paused run")


@pytest.mark.parametrize("approve", [True, False])
def test_run_without_confirm_waits_for_approval(approve, stack, prefect_harness, tmp_path):
    from prefect.flow_runs import resume_flow_run

    store = BackupStore.from_url(f"file://{tmp_path}/store")
    good = _snapshot(stack)
    set_id = _backup(stack, store)
    _damage(stack)
    damaged = _snapshot(stack)
    thread, box = _run_in_thread(store=store, backup_id=set_id, postgres=stack["pg"], redis=stack["redis"],
                                 app=stack["endpoint"])
    paused = _wait_for_paused()
    time.sleep(1)
    assert _snapshot(stack) == damaged and stack["app"].events == []  # nothing happens while paused
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import SetStateStatus

    keyset = paused.state.state_details.run_input_keyset
    with get_client(sync_client=True) as client:
        description = json.loads(client.read_flow_run_input(paused.id, keyset["description"]))
        assert f"type `{stack['db']}`" in description
        # no decision, an approval without the name, a wrong name: the server refuses each, the run stays paused
        for answer in ({"note": "no choice"}, {"decision": "approve"},
                       {"decision": "approve", "confirm_target": "postgres"}):
            assert client.resume_flow_run(paused.id, run_input=answer).status == SetStateStatus.REJECT, answer
            assert client.read_flow_run(paused.id).state.is_paused()
    time.sleep(1)
    assert _snapshot(stack) == damaged and stack["app"].events == []
    answer = ({"decision": "approve", "confirm_target": stack["db"], "approved_by": "e2e"} if approve
              else {"decision": "reject", "note": "test"})  # a rejection needs no name
    resume_flow_run(paused.id, run_input=answer)
    thread.join(timeout=180)
    state = box["state"]
    if approve:
        assert state.is_completed()
        assert _snapshot(stack) == good
    else:
        assert state.is_cancelled()
        assert _snapshot(stack) == damaged
        assert _databases(stack) == [stack["db"]] and stack["app"].events == []


def test_two_recoveries_of_one_target_never_interleave(stack, prefect_harness, tmp_path):
    store = BackupStore.from_url(f"file://{tmp_path}/store")
    good = _snapshot(stack)
    set_id = _backup(stack, store)
    _damage(stack)
    kwargs = dict(store=store, backup_id=set_id, postgres=stack["pg"], redis=stack["redis"],
                  app=stack["endpoint"], confirm=True)
    first, box1 = _run_in_thread(**kwargs)
    second, box2 = _run_in_thread(**kwargs)
    first.join(timeout=300)
    second.join(timeout=300)
    assert box1["state"].is_completed() and box2["state"].is_completed()
    assert [e for e, _ in stack["app"].events] == ["on", "off", "on", "off"]  # one after the other
    assert _snapshot(stack) == good
    assert len([d for d in _databases(stack) if "__pre_restore_" in d]) == 2


def test_verify_backup_passes_good_and_fails_tampered_sets(stack, prefect_harness, tmp_path, capsys):
    store = BackupStore.from_url(f"file://{tmp_path}/store")
    client = store.get_client()
    good_id = _backup(stack, store)
    capsys.readouterr()
    assert cli_main(["backup", "verify", good_id, "--store", f"file://{tmp_path}/store"]) == 0
    assert "restore drill passed" in capsys.readouterr().out
    record = read_verification(client, good_id)
    assert record.ok and record.problems == [] and record.seconds

    # A stored part with one byte flipped.
    flipped_id = _backup(stack, store)
    manifest = Manifest.from_bytes(client.get_bytes(manifest_key(flipped_id)))
    path = tmp_path / "store" / manifest.part("redis").key
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x40
    path.write_bytes(bytes(data))
    state = verify_backup(store=store, backup_id=flipped_id, return_state=True)
    assert state.is_failed()
    record = read_verification(client, flipped_id)
    assert not record.ok and any("redis" in p and "sha256" in p for p in record.problems)

    # A set whose restored table content differs from what its manifest recorded.
    lying_id = _backup(stack, store)
    mpath = tmp_path / "store" / manifest_key(lying_id)
    manifest = Manifest.from_bytes(mpath.read_bytes())
    orders = next(t for t in manifest.part("postgres").tables if t.table == "orders")
    assert orders.checksum and orders.checksum.startswith("xxh64sum:")  # read off the dump itself
    orders.checksum = "xxh64sum:" + format(int(orders.checksum.split(":")[1], 16) ^ 1, "016x")
    mpath.write_bytes(manifest.to_bytes())
    state = verify_backup(store=store, backup_id=lying_id, return_state=True)
    assert state.is_failed()
    assert any("public.orders: content checksum differs" in p for p in read_verification(client, lying_id).problems)
