"""The Redis keyspace digest: an order-independent digest of every key in every database, which proves that a
snapshot or a restore holds the same data (``keyspace_digest``)."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import redis

from blocks.errors import VerificationFailed
from blocks.redis import RedisConnection
from tasks.manifest import RedisSummary
from tasks.redis_client import databases_with_keys, raw_client, talking_to

_MOD = 2**256
_SCAN_COUNT = 2000


def _frame(digest: Any, item: bytes) -> None:
    digest.update(len(item).to_bytes(8, "big"))
    digest.update(item)


def _score(text: bytes) -> bytes:
    # Servers format doubles differently (7.0: %.17g, 7.2+: shortest form): compare the double itself.
    return struct.pack(">d", float(text))


def _key_hash(db: int, key: bytes, kind: bytes, has_ttl: bool, value: Any) -> int:
    """sha256 of one key's db, name, type, TTL flag and canonical value, as an integer."""
    digest = hashlib.sha256()
    _frame(digest, b"%d" % db)
    _frame(digest, key)
    _frame(digest, kind)
    _frame(digest, b"1" if has_ttl else b"0")
    if kind == b"string":
        _frame(digest, value)
    elif kind == b"list":
        for item in value:
            _frame(digest, item)
    elif kind == b"set":
        for item in sorted(value):
            _frame(digest, item)
    elif kind == b"hash":
        for field, item in sorted(zip(value[::2], value[1::2], strict=True)):
            _frame(digest, field)
            _frame(digest, item)
    elif kind == b"zset":
        for member, score in sorted((m, _score(s)) for m, s in zip(value[::2], value[1::2], strict=True)):
            _frame(digest, member)
            _frame(digest, score)
    elif kind == b"stream":
        for entry_id, fields in value:
            _frame(digest, entry_id)
            for item in fields:
                _frame(digest, item)
    # Module types (ReJSON-RL, ...) have no portable canonical form: name, type and TTL flag only.
    return int.from_bytes(digest.digest(), "big")


_FETCH = {
    b"string": ("GET",),  # a key that became a string after MGET
    b"list": ("LRANGE", 0, -1),
    b"set": ("SMEMBERS",),
    b"hash": ("HGETALL",),
    b"zset": ("ZRANGE", 0, -1, "WITHSCORES"),
    b"stream": ("XRANGE", "-", "+"),
}


def _hash_batch(client: redis.Redis, db: int, keys: list[bytes]) -> list[int]:
    """Hashes of the keys that still exist.

    redis-py's cost is per command, so strings (the common case) come from one MGET, which answers nil
    for other types; only those then need TYPE and a read by type. PTTL is one command per key.
    """
    pipe = client.pipeline(transaction=False)
    pipe.execute_command("MGET", *keys)
    for key in keys:
        pipe.execute_command("PTTL", key)
    strings, *ttls = pipe.execute()
    hashes: list[int] = []
    others: list[tuple[bytes, bool]] = []
    for key, value, ttl in zip(keys, strings, ttls, strict=True):
        if ttl == -2:
            continue  # expired or deleted since SCAN returned it
        if value is not None:
            hashes.append(_key_hash(db, key, b"string", ttl >= 0, value))
        else:
            others.append((key, ttl >= 0))
    if not others:
        return hashes
    pipe = client.pipeline(transaction=False)
    for key, _ in others:
        pipe.execute_command("TYPE", key)
    kinds = pipe.execute()
    pipe = client.pipeline(transaction=False)
    present = [(key, kind, has_ttl) for (key, has_ttl), kind in zip(others, kinds, strict=True) if kind != b"none"]
    for key, kind, _ in present:
        fetch = _FETCH.get(kind)
        if fetch is None:
            pipe.execute_command("EXISTS", key)  # a placeholder reply keeps the lists aligned
        else:
            pipe.execute_command(fetch[0], key, *fetch[1:])
    values = pipe.execute() if present else []
    for (key, kind, has_ttl), value in zip(present, values, strict=True):
        hashes.append(_key_hash(db, key, kind, has_ttl, value))
    return hashes


# Reads a batch of keys in one call: for each key its type, PTTL and value, read as _FETCH reads it.
_READ_BATCH = """
local out = {}
for _, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  local value = false
  if kind == 'string' then value = redis.call('GET', key)
  elseif kind == 'list' then value = redis.call('LRANGE', key, 0, -1)
  elseif kind == 'set' then value = redis.call('SMEMBERS', key)
  elseif kind == 'hash' then value = redis.call('HGETALL', key)
  elseif kind == 'zset' then value = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  elseif kind == 'stream' then value = redis.call('XRANGE', key, '-', '+')
  end
  out[#out + 1] = kind
  out[#out + 1] = redis.call('PTTL', key)
  out[#out + 1] = value
end
return out
"""


def _hash_batch_scripted(client: redis.Redis, db: int, keys: list[bytes]) -> list[int]:
    """`_hash_batch` with one server-side script per batch instead of one or two commands per key."""
    reply = client.execute_command("EVAL", _READ_BATCH, len(keys), *keys)
    return [_key_hash(db, key, kind, ttl >= 0, value)
            for key, kind, ttl, value in zip(keys, reply[0::3], reply[1::3], reply[2::3], strict=True)
            if kind != b"none"]


def keyspace_digest(conn: RedisConnection, *, count: int = _SCAN_COUNT, own_server: bool = False) -> RedisSummary:
    """An order-independent digest of every key in every database: same data, same digest.

    Per key: sha256 of db, name, type, whether it has a TTL (not the TTL itself, which moves) and the
    value in a canonical order (hash fields and set members sorted, zset by member with its score as a
    double, list and stream entries in order; stream consumer groups are not included). The per-key
    hashes are added mod 2**256, so SCAN order does not matter. SCAN may return a key twice while the
    server resizes a table, so keys seen are remembered: memory grows with the number of keys (about
    100 bytes each). ``DEBUG DIGEST`` would be simpler but Redis 7 disables DEBUG by default.

    ``own_server``: a scratch server this runbook started; each batch is then read by one Lua script, which
    blocks the server while it runs and so is never used on a server others use. Same digest either way.
    """
    hash_batch = _hash_batch_scripted if own_server else _hash_batch
    where = conn.describe()
    total = 0
    databases: dict[str, int] = {}
    with talking_to(conn, "computing the keyspace digest"):
        for db in sorted(databases_with_keys(conn)):
            client = raw_client(conn, db)
            seen: set[bytes] = set()
            cursor: bytes | int = 0
            while True:
                cursor, keys = client.execute_command("SCAN", cursor, "COUNT", count)
                fresh = [key for key in dict.fromkeys(keys) if key not in seen]
                seen.update(fresh)
                try:
                    hashes = hash_batch(client, db, fresh) if fresh else []
                except redis.ResponseError as exc:
                    raise VerificationFailed(
                        f"Redis {where} db {db}: a key changed while the digest was read ({exc}); "
                        "digest a server nothing writes to"
                    ) from None
                total += sum(hashes)
                databases[str(db)] = databases.get(str(db), 0) + len(hashes)
                if int(cursor) == 0:
                    break
    databases = {db: keys for db, keys in databases.items() if keys}
    return RedisSummary(key_count=sum(databases.values()), digest=f"{total % _MOD:064x}", databases=databases)
