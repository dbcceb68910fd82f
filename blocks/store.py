"""Backup store Block: a local directory or an S3 bucket/prefix, and the backend client built from it."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from blocks._reference import REFERENCEABLE
from blocks._secret import OptionalSecret
from blocks.backends import (
    DEFAULT_STORE,
    DEFAULT_STORE_DIR,
    LocalStore,
    MiB,
    StoreClient,
    StoredObject,
    make_s3_store,
    parse_store_url,
)
from blocks.errors import ConfigurationError

__all__ = ["DEFAULT_STORE", "BackupStore", "StoreClient", "StoredObject"]

_S3_CLIENTS: dict[str, StoreClient] = {}
_S3_CLIENTS_LOCK = threading.Lock()


class BackupStore(Block):
    """Where backups go: a local directory or an S3 bucket (any S3-compatible endpoint)."""

    model_config = REFERENCEABLE
    _block_type_name = "Backup Store"
    _description = "A local directory or an S3 bucket/prefix that holds backup sets."

    backend: Literal["local", "s3"] = Field(default="local")
    path: str = Field(default=DEFAULT_STORE_DIR, description="Local backend: the directory.")
    bucket: str | None = Field(default=None, description="S3 backend: bucket name.")
    prefix: str = Field(default="", description="S3 backend: key prefix inside the bucket.")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint; empty for AWS.")
    region: str | None = Field(default=None)
    access_key_id: OptionalSecret = Field(default=None, description="Empty: boto3's default chain.")
    secret_access_key: OptionalSecret = None
    session_token: OptionalSecret = None
    sse: Literal["", "AES256", "aws:kms"] = Field(default="", description="Server-side encryption.")
    kms_key_id: str | None = Field(default=None, description="KMS key for sse=aws:kms.")
    storage_class: str | None = Field(default=None, description="e.g. STANDARD_IA; empty for default.")
    part_size_mib: int = Field(default=8, ge=5, le=5120, description="Multipart part size.")
    max_concurrency: int = Field(default=4, ge=1, le=32, description="Parts uploaded at once.")

    @classmethod
    def from_url(cls, url: str) -> BackupStore:
        """``file:///dir``, a plain path, or ``s3://bucket/prefix?endpoint_url=...&region=...``.

        S3 credentials never go in the URL: they come from the Block's fields or boto3's default chain
        (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles).
        """
        parsed = parse_store_url(url)
        if parsed.backend == "local":
            return cls(backend="local", path=parsed.path)
        return cls(backend="s3", bucket=parsed.bucket, prefix=parsed.prefix, **parsed.options)

    def describe(self) -> str:
        """Names the store in logs and errors (no credentials)."""
        if self.backend == "local":
            return f"file://{self.path}"
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        prefix = f"/{self.prefix.strip('/')}" if self.prefix.strip("/") else ""
        return f"s3://{self.bucket}{prefix}{where}"

    def get_client(self) -> StoreClient:
        """The backend client; credentials are unwrapped only here.

        S3 clients are cached per process and settings: building a boto3 session costs 0.2-0.5 s and
        ~12 MiB, and a run asks for the client once per step.
        """
        if self.backend == "local":
            return LocalStore(Path(self.path))
        if not self.bucket:
            raise ConfigurationError("S3 store needs a bucket")
        if self.sse == "aws:kms" and not self.kms_key_id:
            raise ConfigurationError("sse=aws:kms needs kms_key_id")
        key = self._cache_key()
        with _S3_CLIENTS_LOCK:
            cached = _S3_CLIENTS.get(key)
            if cached is None:
                cached = _S3_CLIENTS[key] = self._make_s3_client()
        return cached

    def _cache_key(self) -> str:
        """Every field, secrets included, hashed: a changed credential gives a new client."""
        material = [str(getattr(self, name)) if not isinstance(getattr(self, name), SecretStr)
                    else getattr(self, name).get_secret_value() for name in sorted(type(self).model_fields)]
        return hashlib.sha256("\0".join(material).encode()).hexdigest()

    def _make_s3_client(self) -> StoreClient:
        assert self.bucket is not None
        return make_s3_store(
            bucket=self.bucket,
            prefix=self.prefix,
            description=self.describe(),
            endpoint_url=self.endpoint_url,
            region=self.region,
            access_key_id=self.access_key_id.get_secret_value() if self.access_key_id else None,
            secret_access_key=self.secret_access_key.get_secret_value() if self.secret_access_key else None,
            session_token=self.session_token.get_secret_value() if self.session_token else None,
            sse=self.sse,
            kms_key_id=self.kms_key_id,
            storage_class=self.storage_class,
            part_size=self.part_size_mib * MiB,
            max_concurrency=self.max_concurrency,
        )
