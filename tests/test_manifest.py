"""Pure helpers: set ids, object keys, manifest building and parsing, inventory filtering."""

from datetime import UTC, datetime, timedelta

import pytest

from blocks.errors import ConfigurationError, StoreError
from tasks.manifest import (
    Manifest,
    Part,
    TableChecksum,
    build_manifest,
    complete_set_ids,
    decode_name,
    encode_name,
    human_size,
    incomplete_set_ids,
    manifest_key,
    new_set_id,
    part_key,
    set_time,
)

T0 = datetime(2026, 11, 22, 2, 0, 0, tzinfo=UTC)


def _part(set_id: str, name: str = "app", size: int = 10) -> Part:
    return Part(kind="postgres", name=name, key=part_key(set_id, "postgres", name), size=size, raw_size=size * 3,
                sha256="a" * 64, tool="pg_dump")


def test_set_ids_sort_by_time_and_round_trip():
    ids = [new_set_id(T0 + timedelta(seconds=s), entropy="abcdef") for s in (3600, 0, 59, 86400 * 40)]
    assert sorted(ids) == [new_set_id(T0 + timedelta(seconds=s), entropy="abcdef") for s in (0, 59, 3600, 86400 * 40)]
    assert set_time(ids[0]) == T0 + timedelta(hours=1)
    assert new_set_id(T0, entropy="abcdef") == "20261122T020000Z-abcdef"


def test_set_id_rejects_other_text():
    with pytest.raises(ConfigurationError, match="not a backup set id"):
        set_time("2026-11-22")


def test_database_names_become_single_safe_key_segments():
    for name in ["My DB's x", "a/b", "..", "ünïcode", "percent%20"]:
        segment = encode_name(name)
        assert "/" not in segment and segment not in (".", "..")
        assert decode_name(segment) == name
    key = part_key("20261122T020000Z-abcdef", "postgres", "My DB's x")
    assert key == "backups/20261122T020000Z-abcdef/postgres/My%20DB%27s%20x.dump.zst"


def test_only_sets_with_a_manifest_are_complete():
    done, failed = "20261122T020000Z-aaaaaa", "20261123T020000Z-bbbbbb"
    keys = [part_key(done, "postgres", "app"), manifest_key(done), part_key(failed, "postgres", "app"),
            "backups/not-a-set/manifest.json", "elsewhere/manifest.json"]
    assert complete_set_ids(keys) == [done]
    assert incomplete_set_ids(keys) == [failed]


def test_manifest_round_trips_and_sums_sizes():
    set_id = "20261122T020000Z-abcdef"
    part = _part(set_id)
    part.tables.append(TableChecksum(schema_name="public", table="t", rows=3, checksum="h64sum:1"))
    manifest = build_manifest(set_id, [part, _part(set_id, "other", 5)], started_at=T0, completed_at=T0,
                              tags=["nightly"], source={"postgres": "x"}, runbooks_version="0.1")
    again = Manifest.from_bytes(manifest.to_bytes())
    assert again == manifest
    assert again.size == 15 and again.raw_size == 45
    assert again.part("postgres", "other").size == 5


def test_manifest_refuses_empty_duplicate_or_foreign_parts():
    set_id = "20261122T020000Z-abcdef"
    kwargs = dict(started_at=T0, completed_at=T0, tags=[], source={}, runbooks_version="0")
    with pytest.raises(ConfigurationError, match="at least one part"):
        build_manifest(set_id, [], **kwargs)
    with pytest.raises(ConfigurationError, match="duplicate"):
        build_manifest(set_id, [_part(set_id), _part(set_id)], **kwargs)
    with pytest.raises(ConfigurationError, match="outside"):
        build_manifest(set_id, [_part("20261122T020000Z-ffffff")], **kwargs)


def test_bad_or_newer_manifest_is_a_clear_error():
    with pytest.raises(StoreError, match="not valid"):
        Manifest.from_bytes(b'{"set_id": 1}', where="s3://b/x")
    set_id = "20261122T020000Z-abcdef"
    m = build_manifest(set_id, [_part(set_id)], started_at=T0, completed_at=T0, tags=[], source={},
                       runbooks_version="0")
    m.format_version = 99
    with pytest.raises(StoreError, match="upgrade"):
        Manifest.from_bytes(m.to_bytes())


def test_human_size():
    assert human_size(512) == "512 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(3 * 2**30) == "3.0 GiB"
