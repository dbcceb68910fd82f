"""Redis connection Block: address, credentials and TLS, and the redis-py client built from them."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

import redis
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from tasks.errors import ConfigurationError


class RedisConnection(Block):
    """Where a Redis server is and how to authenticate to it."""

    _block_type_name = "Redis Connection"
    _description = "A Redis server: host, port, database number, ACL user/password, TLS."

    host: str = Field(default="127.0.0.1")
    port: int = Field(default=6379, ge=1, le=65535)
    db: int = Field(default=0, ge=0)
    username: str | None = Field(default=None, description="ACL user; empty for the default user.")
    password: SecretStr | None = None
    tls: bool = Field(default=False, description="Connect with TLS (rediss://).")
    tls_ca_file: str | None = Field(default=None, description="CA bundle to verify the server with.")

    @classmethod
    def from_url(cls, url: str) -> RedisConnection:
        """Build from ``redis://[user:password@]host:port/db`` or ``rediss://...`` for TLS."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigurationError(f"not a Redis URL (scheme {parts.scheme!r}); use redis:// or rediss://")
        db_text = parts.path.lstrip("/") or "0"
        if not db_text.isdigit():
            raise ConfigurationError(f"Redis database must be a number, got {db_text!r}")
        query = parse_qs(parts.query)
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(db_text),
            username=unquote(parts.username) if parts.username else None,
            password=SecretStr(unquote(parts.password)) if parts.password else None,
            tls=parts.scheme == "rediss",
            tls_ca_file=query.get("ssl_ca_certs", [None])[0],
        )

    def describe(self) -> str:
        """The connection as a URL without the password."""
        user = f"{self.username}@" if self.username else ""
        return f"{'rediss' if self.tls else 'redis'}://{user}{self.host}:{self.port}/{self.db}"

    def get_client(self, db: int | None = None, **kwargs: object) -> redis.Redis:
        """A redis-py client; ``db`` overrides the Block's database number."""
        options: dict[str, object] = {
            "host": self.host,
            "port": self.port,
            "db": self.db if db is None else db,
            "username": self.username,
            "password": self.password.get_secret_value() if self.password else None,
            "socket_timeout": 60,
            "socket_connect_timeout": 10,
        }
        if self.tls:
            options.update(ssl=True, ssl_ca_certs=self.tls_ca_file)
        options.update(kwargs)
        return redis.Redis(**options)  # type: ignore[arg-type]
