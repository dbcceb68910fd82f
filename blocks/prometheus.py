"""Prometheus HTTP API Block: where the server is and how to authenticate (for a runbook's metric checks)."""

from __future__ import annotations

import httpx
from prefect.blocks.core import Block
from pydantic import Field

from blocks._reference import REFERENCEABLE
from blocks._secret import OptionalSecret
from blocks.http_auth import api_client


class PrometheusAPI(Block):
    """A Prometheus (or compatible: Thanos, Mimir, VictoriaMetrics) query endpoint."""

    model_config = REFERENCEABLE
    _block_type_name = "Prometheus API"
    _description = "A Prometheus query API: base URL, optional basic auth or bearer token."

    url: str = Field(description="e.g. http://prometheus.monitoring:9090")
    username: str | None = Field(default=None, description="Basic auth user (with password).")
    password: OptionalSecret = None
    bearer_token: OptionalSecret = Field(default=None, description="Sent as 'Authorization: Bearer ...'.")
    verify_tls: bool = True

    def describe(self) -> str:
        return self.url.rstrip("/")

    def get_client(self, timeout: float = 10.0) -> httpx.Client:
        """An httpx client for the API; credentials are unwrapped only here."""
        return api_client("PrometheusAPI", self.url.rstrip("/"), username=self.username, password=self.password,
                          bearer_token=self.bearer_token, verify_tls=self.verify_tls, timeout=timeout)
