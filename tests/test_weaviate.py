"""Weaviate in the backup set, through the real httpx client against an HTTP double of Weaviate's backup,
restore, schema and aggregate endpoints (tests/weaviate_double.py), with real Redis, S3 (SeaweedFS) and a
local store. Tests marked `weaviate` run the same against a real server when WEAVIATE_URL is set.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
from pydantic import SecretStr

from blocks.redis import RedisConnection
from blocks.store import BackupStore
from blocks.weaviate import WeaviateConnection
from flows.backup import backup
from flows.disaster_recovery import disaster_recovery
from flows.verify import verify_backup
from tasks.files import tree_digest
from tasks.manifest import set_prefix
from tasks.redis import keyspace_digest
from tasks.retention import delete_set
from tasks.store import list_sets, read_verification
from tests.weaviate_double import WeaviateDouble

pytestmark = pytest.mark.e2e
API_KEY = "weaviate-api-key-not-to-be-seen"
COUNTS = {"Article": 120, "Author": 7}


@pytest.fixture
def weaviate() -> Any:
    with WeaviateDouble(api_key=API_KEY, collections=dict(COUNTS)) as double:
        yield double


def _conn(double: WeaviateDouble, backend: str = "filesystem") -> WeaviateConnection:
    return WeaviateConnection(url=double.url, api_key=SecretStr(API_KEY), backend=backend)


def _status_polls(double: WeaviateDouble, backup_id: str) -> int:
    return sum(1 for method, path, _ in double.requests if method == "GET" and path.endswith(f"/{backup_id}"))


def test_backup_waits_for_success_and_keeps_weaviate_files_in_the_set(weaviate, s3, prefect_harness, caplog):
    store = BackupStore(backend="s3", bucket=s3.bucket, prefix=f"wv-{uuid.uuid4().hex[:8]}",
                        endpoint_url=s3.endpoint_url, region=s3.region, access_key_id=SecretStr(s3.access_key),
                        secret_access_key=SecretStr(s3.secret_key))
    weaviate.store, weaviate.store_prefix = store.get_client(), store.prefix
    result = backup(store=store, weaviate=_conn(weaviate, "s3"), retries=0)

    [manifest] = list_sets(store.get_client())
    part = manifest.part("weaviate")
    assert part is not None and part.weaviate is not None
    summary = part.weaviate
    assert summary.objects == COUNTS and summary.collections == sorted(COUNTS)
    assert summary.backup_id == f"runbooks-{result.set_id.lower()}"
    assert _status_polls(weaviate, summary.backup_id) >= weaviate.polls  # waited for SUCCESS
    # Weaviate wrote into the set's own prefix of the store's bucket: retention removes the two together.
    files = [o.key for o in store.get_client().list(f"{set_prefix(result.set_id)}weaviate/{summary.backup_id}/")]
    assert files and summary.bucket == s3.bucket
    delete_set.fn(store, result.set_id, complete=True)
    assert store.get_client().list(set_prefix(result.set_id)) == []
    assert weaviate.unauthorized == 0 and API_KEY not in caplog.text


def test_a_failed_weaviate_backup_fails_the_run_and_lists_no_set(weaviate, prefect_harness, tmp_path):
    store = BackupStore.from_url(f"file://{tmp_path}/store")
    weaviate.fail_backup = "no space left on device"
    state = backup(store=store, weaviate=_conn(weaviate), paths=[str(tmp_path)], retries=0, return_state=True)
    assert state.is_failed()
    assert "no space left on device" in str(state.result(raise_on_failure=False))
    assert list_sets(store.get_client()) == []
    assert store.get_client().list("backups/") == []


@pytest.fixture
def stack(weaviate, scratch_redis, tmp_path) -> dict[str, Any]:
    redis = RedisConnection.from_url(scratch_redis.url)
    client = redis.get_client()
    for i in range(200):
        client.set(f"k{i}", f"v{i}")
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.txt").write_text("a")
    store = BackupStore.from_url(f"file://{tmp_path}/store")
    set_id = backup(store=store, redis=redis, paths=[str(media)], weaviate=_conn(weaviate), retries=0).set_id
    # The disaster: the vectors are gone, Redis and the files changed.
    weaviate.collections.clear()
    client.flushall()
    client.set("new", "1")
    (media / "a.txt").write_text("changed")
    return {"store": store, "set_id": set_id, "redis": redis, "media": media, "weaviate": weaviate}


def _state(s: dict[str, Any]) -> tuple:
    return (keyspace_digest(s["redis"]), tree_digest(s["media"]), dict(s["weaviate"].collections))


def _recover(s: dict[str, Any]) -> Any:
    return disaster_recovery(store=s["store"], backup_id=s["set_id"], redis=s["redis"], weaviate=_conn(s["weaviate"]),
                             confirm=True, return_state=True)


def test_recovery_restores_weaviate_and_its_counts_match(stack, prefect_harness):
    state = _recover(stack)
    assert state.is_completed(), state
    assert stack["weaviate"].collections == COUNTS
    assert state.result().rto_seconds["weaviate"] >= 0


def test_a_refused_weaviate_restore_undoes_the_other_parts(stack, prefect_harness):
    before = _state(stack)
    stack["weaviate"].fail_restore = "restore failed: shard corrupted"
    state = _recover(stack)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "shard corrupted" in message and "every change was undone" in message
    assert _state(stack) == before  # Redis reloaded from its safety copy, the directory renamed back


def test_restore_into_existing_collections_is_refused_before_anything_changes(stack, prefect_harness):
    stack["weaviate"].collections["Article"] = 1
    before = _state(stack)
    state = _recover(stack)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "already has the collection(s) ['Article']" in message and "nothing was changed" in message
    assert _state(stack) == before
    assert not [p for m, p, _b in stack["weaviate"].requests if m == "POST" and p.endswith("/restore")]


def test_the_drill_reports_weaviate_as_stored_not_restored_unless_it_has_a_drill_server(stack, prefect_harness):
    result = verify_backup(store=stack["store"], backup_id=stack["set_id"])
    assert result.ok and any("stored, not restored" in n for n in result.notes)
    assert read_verification(stack["store"].get_client(), stack["set_id"]).notes == result.notes

    # A drill Weaviate that sees the same backups (one backend): restored, counted, and cleaned up after.
    with WeaviateDouble(api_key=API_KEY, backups=stack["weaviate"].backups) as drill:
        result = verify_backup(store=stack["store"], backup_id=stack["set_id"], drill_weaviate=_conn(drill))
        assert result.ok and result.notes == [] and "weaviate" in result.seconds
        assert drill.collections == {}
        restores = [p for m, p, _b in drill.requests if m == "POST" and p.endswith("/restore")]
        assert len(restores) == 1


@pytest.mark.weaviate
def test_a_real_weaviate_backs_up_and_restores(tmp_path, prefect_harness):
    """Needs WEAVIATE_URL (and WEAVIATE_API_KEY, WEAVIATE_BACKEND) of a disposable server with a backup module."""
    url = os.environ.get("WEAVIATE_URL")
    if not url:
        pytest.fail("the weaviate suite needs WEAVIATE_URL: a disposable server with a backup module enabled")
    key = os.environ.get("WEAVIATE_API_KEY")
    conn = WeaviateConnection(url=url, api_key=SecretStr(key) if key else None,
                              backend=os.environ.get("WEAVIATE_BACKEND", "filesystem"))  # type: ignore[arg-type]
    store = BackupStore.from_url(f"file://{tmp_path}/store")
    set_id = backup(store=store, weaviate=conn, retries=0).set_id
    [manifest] = list_sets(store.get_client())
    assert manifest.part("weaviate").weaviate.objects is not None
    assert set_id
