"""Redis connection Block: address, credentials and TLS, and the redis-py client built from them."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

import redis
from prefect.blocks.core import Block
from pydantic import Field, SecretStr, model_validator

from blocks._reference import REFERENCEABLE
from blocks._secret import OptionalSecret
from blocks.errors import ConfigurationError
from blocks.tlsfiles import pem_file


class RedisConnection(Block):
    """Where a Redis server is and how to authenticate to it."""

    model_config = REFERENCEABLE
    _block_type_name = "Redis Connection"
    _description = "A Redis server: host, port, database number, ACL user/password, TLS."

    host: str = Field(default="127.0.0.1")
    port: int = Field(default=6379, ge=1, le=65535)
    db: int = Field(default=0, ge=0)
    username: str | None = Field(default=None, description="ACL user; empty for the default user.")
    password: OptionalSecret = None
    tls: bool = Field(default=False, description="Connect with TLS (rediss://).")
    tls_ca_file: str | None = Field(default=None, description="CA bundle to verify the server with (a file "
                                                              "path or PEM text); the host name is checked too.")
    tls_cert_file: str | None = Field(default=None, description="Client certificate for servers with "
                                                                "tls-auth-clients (a file path or PEM text).")
    tls_key: SecretStr | None = Field(default=None, description="The client certificate's private key (PEM text, "
                                                                "written 0600 to a private file, or a file path).")

    @model_validator(mode="after")
    def _client_cert_pair(self) -> RedisConnection:
        if (self.tls_cert_file is None) != (self.tls_key is None):
            raise ValueError("tls_cert_file and tls_key go together (a client certificate and its private key)")
        if self.tls_cert_file and not self.tls:
            raise ValueError("a client certificate needs tls (rediss://)")
        return self

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
            options.update(ssl=True, ssl_check_hostname=True, ssl_cert_reqs="required",
                           ssl_ca_certs=pem_file(self.tls_ca_file) if self.tls_ca_file else None)
            if self.tls_cert_file and self.tls_key:
                options.update(ssl_certfile=pem_file(self.tls_cert_file),
                               ssl_keyfile=pem_file(self.tls_key.get_secret_value(), secret=True))
        options.update(kwargs)
        return redis.Redis(**options)  # type: ignore[arg-type]
