"""What every Redis step needs of a client: redis-py's errors turned into ours (naming the server, never the
password), a client that returns replies exactly as sent, and the databases that hold keys."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from blocks.errors import ConnectionFailed
from blocks.redis import RedisConnection


@contextmanager
def talking_to(conn: RedisConnection, doing: str) -> Iterator[None]:
    """Turn redis-py's errors into ours, naming the server (never the password)."""
    try:
        yield
    except redis.AuthenticationError as exc:
        raise ConnectionFailed(
            f"Redis {conn.describe()} refused the credentials while {doing}: {exc}; check the RedisConnection block"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ConnectionFailed(f"Redis {conn.describe()} could not be reached while {doing}: {exc}") from None
    except redis.ResponseError as exc:
        if str(exc).startswith(("NOAUTH", "NOPERM")):
            raise ConnectionFailed(f"Redis {conn.describe()} refused {doing}: {exc}") from None
        raise


def raw_client(conn: RedisConnection, db: int) -> redis.Redis:
    """A client that returns replies exactly as sent (bytes, flat arrays): no parsing into dicts/floats.

    RESP2 on purpose: redis-py 8 speaks RESP3 by default, whose maps, sets and doubles come back as
    Python dicts, sets and floats whatever the callbacks.
    """
    client = conn.get_client(db=db, protocol=2)
    client.response_callbacks.clear()
    return client


def databases_with_keys(conn: RedisConnection) -> dict[int, int]:
    """Databases that hold keys, from INFO keyspace: {index: key count}."""
    keyspace = conn.get_client().info("keyspace")
    return {int(name[2:]): int(stats["keys"]) for name, stats in keyspace.items() if name.startswith("db")}
