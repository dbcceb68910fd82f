"""PostgreSQL connection Block: connection details and the password, and the clients built from them."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import psycopg
from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator, model_validator

from blocks._reference import REFERENCEABLE
from blocks._secret import OptionalSecret
from blocks.errors import ConfigurationError, ConnectionFailed
from blocks.tlsfiles import pem_file


class PostgresConnection(Block):
    """Where a PostgreSQL server is and how to log in to it."""

    model_config = REFERENCEABLE
    _block_type_name = "Postgres Connection"
    _description = "A PostgreSQL server: host, port, user, password and default database."

    host: str = Field(default="127.0.0.1", description="Host name or IP address (or a Unix socket dir).")
    port: int = Field(default=5432, ge=1, le=65535)
    user: str = Field(default="postgres")
    password: OptionalSecret = Field(default=None, description="Left empty: libpq's ~/.pgpass is used.")
    database: str = Field(default="postgres", description="Database to connect to for server-wide work.")
    sslmode: str | None = Field(default=None, description=(
        "libpq sslmode: disable, allow, prefer, require, verify-ca, verify-full. Empty: verify-full when "
        "sslrootcert is given, else prefer."))
    sslrootcert: str | None = Field(default=None, description=(
        "CA certificate(s) the server's certificate must chain to: PEM text, or a file path on the machine "
        "that runs the flow."))
    sslcert: str | None = Field(default=None, description="Client certificate (PEM text or a file path) for "
                                                          "certificate authentication; needs sslkey.")
    sslkey: SecretStr | None = Field(default=None, description=(
        "The client certificate's private key (PEM text or a file path); PEM text is written 0600 to a "
        "private temporary file that libpq and the tools read."))

    @field_validator("sslmode")
    @classmethod
    def _known_sslmode(cls, value: str | None) -> str | None:
        if value is not None and value not in SSLMODES:
            raise ValueError(f"sslmode {value!r}: use one of {', '.join(SSLMODES)}")
        return value

    @model_validator(mode="after")
    def _client_cert_pair(self) -> PostgresConnection:
        if (self.sslcert is None) != (self.sslkey is None):
            raise ValueError("sslcert and sslkey go together (a client certificate and its private key)")
        return self

    @property
    def effective_sslmode(self) -> str:
        """The sslmode libpq gets: the field, or verify-full with a CA, else prefer."""
        return self.sslmode or ("verify-full" if self.sslrootcert else "prefer")

    def tls_files(self) -> dict[str, str]:
        """libpq's ``sslrootcert``/``sslcert``/``sslkey`` as file paths; PEM text is written once per process
        into a private (0700) directory, the key 0600, removed when the process exits."""
        files: dict[str, str] = {}
        for name, value, secret in (("sslrootcert", self.sslrootcert, False), ("sslcert", self.sslcert, False),
                                    ("sslkey", self.sslkey.get_secret_value() if self.sslkey else None, True)):
            if value:
                files[name] = pem_file(value, secret=secret)
        return files

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
            sslmode=query.get("sslmode", [None])[0],
            sslrootcert=query.get("sslrootcert", [None])[0],
        )

    def describe(self, database: str | None = None) -> str:
        """The connection as a URL without the password, for logs and error messages."""
        db = database if database is not None else self.database
        return f"postgresql://{quote(self.user)}@{self.host}:{self.port}/{quote(db, safe='')}"

    def connect(self, database: str | None = None, **kwargs: Any) -> psycopg.Connection:
        """Open a psycopg connection; a failure names host and database, never the password."""
        db = database if database is not None else self.database
        params: dict[str, Any] = {**self.libpq_params(db), **kwargs}
        try:
            return psycopg.connect(**params)
        except psycopg.OperationalError as exc:
            raise self.connection_failed(db, str(exc)) from None

    def connection_failed(self, database: str, message: str) -> ConnectionFailed:
        """The error for a failed connection to ``database``: libpq's ``message``, the password redacted."""
        reason = _redact(message.strip(), self.password)
        return ConnectionFailed(f"cannot connect to PostgreSQL {self.describe(database)}: {reason}{_tls_hint(reason)}")

    def libpq_params(self, database: str | None = None) -> dict[str, str]:
        """libpq connection keywords (the password among them), for a connection made in this process."""
        params = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "dbname": database if database is not None else self.database,
            "sslmode": self.effective_sslmode,
            "connect_timeout": "10",
            "application_name": "runbooks",
            **self.tls_files(),
        }
        if self.password is not None:
            params["password"] = self.password.get_secret_value()
        return params

    def libpq_env(self, database: str | None = None) -> dict[str, str]:
        """Environment for libpq command-line tools: the password goes here, never into argv."""
        env = {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGDATABASE": database if database is not None else self.database,
            "PGSSLMODE": self.effective_sslmode,
            "PGAPPNAME": "runbooks",
            "PGCONNECT_TIMEOUT": "10",
        }
        env.update({f"PG{name.upper()}": path for name, path in self.tls_files().items()})
        if self.password is not None:
            env["PGPASSWORD"] = self.password.get_secret_value()
        return env


SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _tls_hint(reason: str) -> str:
    if "certificate verify failed" in reason:
        return (" (the server's certificate does not chain to sslrootcert: give the CA that signed it, or the "
                "server presents another certificate)")
    if "does not match host name" in reason or "server certificate for" in reason:
        return " (the certificate is not for this host name: connect by a name the certificate lists)"
    if "root certificate file" in reason:
        return " (sslmode verify-ca/verify-full needs sslrootcert)"
    if "server does not support SSL" in reason:
        return " (the server has ssl = off: enable TLS on it, or lower sslmode)"
    return ""


def _redact(text: str, secret: SecretStr | None) -> str:
    if secret is not None and secret.get_secret_value():
        return text.replace(secret.get_secret_value(), "**********")
    return text
