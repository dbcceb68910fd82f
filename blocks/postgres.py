"""PostgreSQL connection Block: connection details and the password, and the clients built from them."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import psycopg
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from tasks.errors import ConfigurationError, ConnectionFailed


class PostgresConnection(Block):
    """Where a PostgreSQL server is and how to log in to it."""

    _block_type_name = "Postgres Connection"
    _description = "A PostgreSQL server: host, port, user, password and default database."

    host: str = Field(default="127.0.0.1", description="Host name or IP address (or a Unix socket dir).")
    port: int = Field(default=5432, ge=1, le=65535)
    user: str = Field(default="postgres")
    password: SecretStr | None = Field(default=None, description="Left empty: libpq's ~/.pgpass is used.")
    database: str = Field(default="postgres", description="Database to connect to for server-wide work.")
    sslmode: str = Field(default="prefer", description="libpq sslmode: disable, prefer, require, verify-full.")

    @classmethod
    def from_url(cls, url: str) -> PostgresConnection:
        """Build from ``postgresql://user:password@host:port/database?sslmode=...``."""
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ConfigurationError(f"not a PostgreSQL URL (scheme {parts.scheme!r}); use postgresql://...")
        query = parse_qs(parts.query)
        try:
            port = parts.port or 5432
        except ValueError as exc:
            raise ConfigurationError(f"bad port in PostgreSQL URL for host {parts.hostname!r}") from exc
        return cls(
            host=unquote(parts.hostname or "127.0.0.1"),
            port=port,
            user=unquote(parts.username or "postgres"),
            password=SecretStr(unquote(parts.password)) if parts.password else None,
            database=unquote(parts.path.lstrip("/")) or "postgres",
            sslmode=query.get("sslmode", ["prefer"])[0],
        )

    def describe(self, database: str | None = None) -> str:
        """The connection as a URL without the password, for logs and error messages."""
        db = database if database is not None else self.database
        return f"postgresql://{quote(self.user)}@{self.host}:{self.port}/{quote(db, safe='')}"

    def connect(self, database: str | None = None, **kwargs: Any) -> psycopg.Connection:
        """Open a psycopg connection; a failure names host and database, never the password."""
        db = database if database is not None else self.database
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": db,
            "sslmode": self.sslmode,
            "connect_timeout": 10,
            "application_name": "runbooks",
        }
        if self.password is not None:
            params["password"] = self.password.get_secret_value()
        params.update(kwargs)
        try:
            return psycopg.connect(**params)
        except psycopg.OperationalError as exc:
            reason = _redact(str(exc).strip(), self.password)
            raise ConnectionFailed(f"cannot connect to PostgreSQL {self.describe(db)}: {reason}") from None

    def libpq_env(self, database: str | None = None) -> dict[str, str]:
        """Environment for libpq command-line tools: the password goes here, never into argv."""
        env = {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGDATABASE": database if database is not None else self.database,
            "PGSSLMODE": self.sslmode,
            "PGAPPNAME": "runbooks",
            "PGCONNECT_TIMEOUT": "10",
        }
        if self.password is not None:
            env["PGPASSWORD"] = self.password.get_secret_value()
        return env


def _redact(text: str, secret: SecretStr | None) -> str:
    if secret is not None and secret.get_secret_value():
        return text.replace(secret.get_secret_value(), "**********")
    return text
