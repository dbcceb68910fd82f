"""Backup sets, object keys and the manifest: pure logic, no I/O.

A backup set lives under ``backups/<set id>/``. It exists only once ``manifest.json`` is written, last;
listing, restore and retention ignore a set without one.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime
from typing import ClassVar, Literal, Self
from urllib.parse import quote, unquote

from pydantic import BaseModel, Field, ValidationError

from blocks.errors import ConfigurationError, StoreError

MANIFEST_NAME = "manifest.json"
VERIFICATION_NAME = "verification.json"
SETS_PREFIX = "backups/"
FORMAT_VERSION = 1
_SET_ID = re.compile(r"^(\d{8}T\d{6}Z)-([0-9a-f]{6})$")

# pgbase: physical base backup (PITR); weaviate: a descriptor of a backup Weaviate wrote to its own backend
PartKind = Literal["postgres", "globals", "redis", "files", "pgbase", "weaviate"]


def new_set_id(now: datetime | None = None, entropy: str | None = None) -> str:
    """A set id that sorts by creation time (UTC), e.g. ``20261122T020000Z-3fa9c1``."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{entropy or secrets.token_hex(3)}"


def set_time(set_id: str) -> datetime:
    """When a set was started, read from its id."""
    match = _SET_ID.match(set_id)
    if not match:
        raise ConfigurationError(f"{set_id!r} is not a backup set id (like 20261122T020000Z-3fa9c1)")
    return datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def is_set_id(text: str) -> bool:
    return bool(_SET_ID.match(text))


def set_prefix(set_id: str) -> str:
    return f"{SETS_PREFIX}{set_id}/"


def manifest_key(set_id: str) -> str:
    return f"{set_prefix(set_id)}{MANIFEST_NAME}"


def verification_key(set_id: str) -> str:
    """Written by `verify-backup` beside the manifest; a set is *verified* when it says ok."""
    return f"{set_prefix(set_id)}{VERIFICATION_NAME}"


def encode_name(name: str) -> str:
    """A database name or path as one safe key segment (``My DB's`` -> ``My%20DB%27s``)."""
    return quote(name, safe="") if name not in ("", ".", "..") else quote(name, safe="").replace(".", "%2E")


def decode_name(segment: str) -> str:
    return unquote(segment)


def part_key(set_id: str, kind: PartKind, name: str = "") -> str:
    """Deterministic object key of one part of a set."""
    base = set_prefix(set_id)
    match kind:
        case "postgres":
            return f"{base}postgres/{encode_name(name)}.dump.zst"
        case "globals":
            return f"{base}postgres/globals.sql.zst"
        case "redis":
            return f"{base}redis/{encode_name(name or 'redis')}.rdb.zst"
        case "files":
            return f"{base}files/{encode_name(name)}.tar.zst"
        case "weaviate":
            return f"{base}weaviate/{encode_name(name or 'weaviate')}.json.zst"
    raise ConfigurationError(f"unknown part kind {kind!r}")


def part_key_problem(set_id: str, key: str) -> str | None:
    """Why a part key read from a manifest cannot be used (None: it can): it must be a relative key under
    the set's prefix with no empty, ``.`` or ``..`` segment and no NUL, backslash or control character."""
    if "\0" in key or any(ord(c) < 32 or ord(c) == 127 for c in key) or "\\" in key:
        return "holds a NUL, backslash or control character"
    if key.startswith("/"):
        return "is absolute"
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        return "has an empty, '.' or '..' segment"
    if not key.startswith(set_prefix(set_id)) or key == set_prefix(set_id):
        return f"is not under the set's prefix {set_prefix(set_id)}"
    return None


def complete_set_ids(keys: list[str]) -> list[str]:
    """Ids of sets that have a manifest, oldest first; anything else in the store is ignored."""
    ids = set()
    for key in keys:
        if not key.startswith(SETS_PREFIX) or not key.endswith("/" + MANIFEST_NAME):
            continue
        set_id = key[len(SETS_PREFIX) : -len(MANIFEST_NAME) - 1]
        if is_set_id(set_id):
            ids.add(set_id)
    return sorted(ids)


def incomplete_set_ids(keys: list[str]) -> list[str]:
    """Ids of sets that have parts but no manifest (failed or still running)."""
    seen = set()
    for key in keys:
        if key.startswith(SETS_PREFIX):
            candidate = key[len(SETS_PREFIX) :].split("/", 1)[0]
            if is_set_id(candidate):
                seen.add(candidate)
    return sorted(seen - set(complete_set_ids(keys)))


# -------------------------------------------------------------------------------------------- models


class TableChecksum(BaseModel):
    """Row count and an order-independent content checksum of one table, taken in the dump's snapshot."""

    schema_name: str
    table: str
    rows: int
    checksum: str | None = Field(default=None, description="None when skipped for size.")

    @property
    def qualified(self) -> str:
        return f"{self.schema_name}.{self.table}"


class RedisSummary(BaseModel):
    key_count: int
    digest: str
    databases: dict[str, int] = Field(default_factory=dict)


class WeaviateSummary(BaseModel):
    """A Weaviate backup: where Weaviate wrote it and what it held just before."""

    backend: str
    backup_id: str
    collections: list[str]
    objects: dict[str, int] = Field(description="Objects per collection (aggregate API) just before the backup.")
    bucket: str | None = None
    path: str | None = Field(default=None, description="Where the backend wrote it (as Weaviate reports).")
    store_prefix: str | None = Field(default=None, description="The key prefix of its files in the backup store, "
                                                               "when Weaviate wrote into the set's own prefix.")


class FilesSummary(BaseModel):
    files: int
    bytes: int
    digest: str


class RoleSettings(BaseModel):
    """``ALTER DATABASE ... SET`` (``role`` None) or ``ALTER ROLE role IN DATABASE ... SET``: ``name=value``
    entries as ``pg_db_role_setting.setconfig`` stores them."""

    role: str | None = None
    settings: list[str]


class DatabaseProperties(BaseModel):
    """What a database is beyond its contents, read from the catalogs at dump time, so a restore under
    another name can be made the same: ``pg_restore`` without ``--create`` restores none of it."""

    encoding: str
    collate: str
    ctype: str
    locale_provider: Literal["libc", "icu"] = "libc"
    icu_locale: str | None = None
    owner: str
    acl: list[str] | None = Field(default=None, description="aclitems; None: the default privileges.")
    connection_limit: int = -1
    comment: str | None = None
    settings: list[RoleSettings] = Field(default_factory=list)


class Part(BaseModel):
    """One stored object of a set and what it holds."""

    kind: PartKind
    name: str
    key: str
    size: int = Field(description="Stored (compressed) bytes.")
    raw_size: int = Field(description="Bytes before compression.")
    sha256: str = Field(description="Of the stored bytes.")
    compression: str = "zstd"
    compression_level: int = 1
    tool: str
    tool_version: str = ""
    server_version: str = ""
    seconds: float = 0.0
    tables: list[TableChecksum] = Field(default_factory=list)
    redis: RedisSummary | None = None
    files: FilesSummary | None = None
    weaviate: WeaviateSummary | None = None
    database: DatabaseProperties | None = Field(default=None, description="PostgreSQL parts: the database's "
                                                "properties (sets made before they were recorded lack them).")


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    set_id: str
    started_at: datetime
    completed_at: datetime
    tags: list[str] = Field(default_factory=list)
    source: dict[str, str] = Field(default_factory=dict, description="Where each part came from.")
    runbooks_version: str = ""
    flow_run_id: str | None = None
    parts: list[Part]
    pitr: PhysicalBackup | None = Field(default=None, description="Physical base backups: WAL range and timeline.")

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def raw_size(self) -> int:
        return sum(p.raw_size for p in self.parts)

    def part(self, kind: PartKind, name: str = "") -> Part | None:
        for part in self.parts:
            if part.kind == kind and (not name or part.name == name):
                return part
        return None

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "") -> Manifest:
        try:
            manifest = cls.model_validate_json(data)
        except ValidationError as exc:
            raise StoreError(f"manifest {where} is not valid: {exc.errors()[0]['msg']}") from None
        if manifest.format_version > FORMAT_VERSION:
            raise StoreError(
                f"manifest {where} has format {manifest.format_version}; this version reads up to "
                f"{FORMAT_VERSION}: upgrade runbooks"
            )
        if not is_set_id(manifest.set_id):
            raise StoreError(f"manifest {where}: set id {manifest.set_id[:80]!r} is not a backup set id")
        for part in manifest.parts:
            problem = part_key_problem(manifest.set_id, part.key)
            if problem:
                raise StoreError(f"manifest {where}: part key {part.key[:200]!r} {problem}; refusing the whole "
                                 "manifest (nothing was read or written)")
        return manifest


class JsonRecord(BaseModel):
    """A record kept as one JSON object in the store; a bad one is a StoreError naming where it is."""

    _what: ClassVar[str] = "record"

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "") -> Self:
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise StoreError(f"{cls._what} {where} is not valid: {exc.errors()[0]['msg']}") from None


class Verification(JsonRecord):
    """Result of one restore drill of a set (``verification.json``); the newest drill wins."""

    _what: ClassVar[str] = "verification record"

    set_id: str
    verified_at: datetime
    ok: bool
    problems: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list, description="Parts the drill could not restore (so does not "
                                                               "vouch for), e.g. Weaviate without a drill server.")
    seconds: dict[str, float] = Field(default_factory=dict, description="Per component restore/check time.")
    flow_run_id: str | None = None


def build_manifest(
    set_id: str,
    parts: list[Part],
    *,
    started_at: datetime,
    completed_at: datetime,
    tags: list[str],
    source: dict[str, str],
    runbooks_version: str,
    flow_run_id: str | None = None,
) -> Manifest:
    """Check the parts belong together and make the manifest; refuses an empty or inconsistent set."""
    if not parts:
        raise ConfigurationError("a backup set needs at least one part")
    keys = [p.key for p in parts]
    if len(set(keys)) != len(keys):
        raise ConfigurationError(f"duplicate part keys in set {set_id}")
    prefix = set_prefix(set_id)
    stray = [k for k in keys if not k.startswith(prefix)]
    if stray:
        raise ConfigurationError(f"parts outside set {set_id}: {stray}")
    return Manifest(
        set_id=set_id,
        started_at=started_at,
        completed_at=completed_at,
        tags=tags,
        source=source,
        runbooks_version=runbooks_version,
        flow_run_id=flow_run_id,
        parts=parts,
    )


def human_size(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num) < 1024 or unit == "TiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} TiB"


# ------------------------------------------------------------------------------------- physical backups

BASE_TAR = "base.tar"
BACKUP_MANIFEST = "backup_manifest"


def base_backup_key(set_id: str, name: str = BASE_TAR) -> str:
    """Key of a physical base backup's tar (``base.tar``) or PostgreSQL's ``backup_manifest`` beside it."""
    return f"{set_prefix(set_id)}pgbase/{encode_name(name)}.zst"


class PhysicalBackup(BaseModel):
    """Where a physical base backup sits in the WAL: restore replays from ``start_lsn`` and is consistent
    from ``stop_lsn`` on; everything needed to choose it for a target and to check its WAL chain."""

    timeline: int
    start_lsn: str
    checkpoint_lsn: str
    stop_lsn: str
    start_wal: str = Field(description="First WAL segment the backup needs.")
    stop_wal: str = Field(description="Last WAL segment the backup needs to become consistent.")
    stop_time: datetime = Field(description="Server clock once the backup had ended; targets after it can use it.")
    system_identifier: str
    server_version: str
    segment_size: int
    archive_command: str = Field(description="Of the source; restore_command is derived from it by default.")
    files: int = Field(description="Files in the backup (from PostgreSQL's backup_manifest).")
    files_verified: bool = Field(description="Every file re-read from the store matched backup_manifest.")


class RestorePointRecord(BaseModel):
    """A named restore point (``pg_create_restore_point``), kept in the store so a restore can find it."""

    name: str
    lsn: str
    timeline: int
    created_at: datetime
    system_identifier: str

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2).encode() + b"\n"


Manifest.model_rebuild()
