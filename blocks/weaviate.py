"""Weaviate connection Block: where the vector database is, its API key, and the backup backend it uses."""

from __future__ import annotations

from typing import Literal

import httpx
from prefect.blocks.core import Block
from pydantic import Field

from blocks._reference import REFERENCEABLE
from blocks._secret import OptionalSecret


class WeaviateConnection(Block):
    """A Weaviate server and the backup module (backend) it has enabled."""

    model_config = REFERENCEABLE
    _block_type_name = "Weaviate Connection"
    _description = "A Weaviate server: URL, API key and the backup backend (s3 or filesystem) it writes to."

    url: str = Field(description="e.g. http://weaviate.internal:8080")
    api_key: OptionalSecret = Field(default=None, description="Sent as 'Authorization: Bearer <key>'.")
    backend: Literal["s3", "filesystem"] = Field(
        default="filesystem", description="The backup module Weaviate has enabled (backup-s3 or "
                                          "backup-filesystem).")
    s3_bucket: str | None = Field(default=None, description="s3 backend: bucket to write backups to; empty: the "
                                                            "server's BACKUP_S3_BUCKET. With an S3 store, "
                                                            "`backup` uses the store's bucket and set prefix.")
    s3_path: str | None = Field(default=None, description="s3 backend: path in the bucket; empty: the server's.")
    verify_tls: bool = True

    def describe(self) -> str:
        return self.url.rstrip("/")

    def get_client(self, timeout: float = 30.0) -> httpx.Client:
        """An httpx client with the API key set; the key is unwrapped only here."""
        headers = {"Content-Type": "application/json"}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key.get_secret_value()}"
        return httpx.Client(base_url=self.url.rstrip("/"), headers=headers, timeout=timeout,
                            verify=self.verify_tls)
