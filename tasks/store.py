"""Store steps: read the inventory (manifests only), write a manifest last, clean up a failed set."""

from __future__ import annotations

import difflib

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.store import BackupStore, StoreClient
from tasks.errors import BackupNotFound, StoreError
from tasks.log import run_logger
from tasks.manifest import (
    Manifest,
    complete_set_ids,
    human_size,
    is_set_id,
    manifest_key,
    set_prefix,
)


def list_sets(client: StoreClient) -> list[Manifest]:
    """Every complete set (one with a manifest), oldest first. Sets without a manifest do not exist."""
    ids = complete_set_ids([o.key for o in client.list("backups/")])
    return [read_manifest(client, set_id) for set_id in ids]


def read_manifest(client: StoreClient, set_id: str) -> Manifest:
    key = manifest_key(set_id)
    manifest = Manifest.from_bytes(client.get_bytes(key), where=f"{client.description}/{key}")
    if manifest.set_id != set_id:
        raise StoreError(f"{client.description}/{key} describes set {manifest.set_id}, not {set_id}")
    return manifest


def find_set(client: StoreClient, wanted: str) -> Manifest:
    """The set with id ``wanted`` (or ``latest``); an unknown id names the nearest existing ones."""
    ids = complete_set_ids([o.key for o in client.list("backups/")])
    if wanted == "latest":
        if not ids:
            raise BackupNotFound(f"no complete backup set in {client.description}")
        return read_manifest(client, ids[-1])
    if wanted in ids:
        return read_manifest(client, wanted)
    nearest = difflib.get_close_matches(wanted, ids, n=3, cutoff=0.0) if ids else []
    hint = f"; nearest: {', '.join(nearest)}" if nearest else "; the store has no complete set"
    what = "no complete backup set" if is_set_id(wanted) else "not a backup set id"
    raise BackupNotFound(f"{what} {wanted!r} in {client.description}{hint}")


@task(retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE)
def write_manifest(store: BackupStore, manifest: Manifest) -> str:
    """Check every part is in the store with its recorded size, then write the manifest, last."""
    client = store.get_client()
    stored = {o.key: o.size for o in client.list(set_prefix(manifest.set_id))}
    for part in manifest.parts:
        if stored.get(part.key) != part.size:
            raise StoreError(
                f"store {client.description}: part {part.key} is {stored.get(part.key)} bytes, "
                f"expected {part.size}; manifest not written"
            )
    key = manifest_key(manifest.set_id)
    client.put_bytes(key, manifest.to_bytes())
    run_logger().info("backup set %s complete: %d parts, %s in %s", manifest.set_id, len(manifest.parts),
                      human_size(manifest.size), client.description)
    return key


@task(retries=4, retry_delay_seconds=[2, 5, 10, 20], cache_policy=NO_CACHE)
def discard_incomplete_set(store: BackupStore, set_id: str) -> int:
    """After a failed run: abort its multipart uploads and delete its parts. Never touches a manifest."""
    client = store.get_client()
    prefix = set_prefix(set_id)
    if client.exists(manifest_key(set_id)):
        raise StoreError(f"set {set_id} has a manifest; refusing to discard it")
    aborted = client.abort_incomplete_uploads(prefix)
    removed = 0
    for obj in client.list(prefix):
        client.delete(obj.key)
        removed += 1
    run_logger().info("discarded incomplete set %s in %s: %d parts deleted, %d uploads aborted",
                      set_id, client.description, removed, aborted)
    return removed + aborted
