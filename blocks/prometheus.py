"""Prometheus HTTP API Block: where the server is and how to authenticate (for a runbook's metric checks)."""

from __future__ import annotations

import httpx
from pydantic import Field

from blocks._reference import REFERENCEABLE
from blocks.http_auth import HttpApiBlock, api_client


class PrometheusAPI(HttpApiBlock):
    """A Prometheus (or compatible: Thanos, Mimir, VictoriaMetrics) query endpoint."""

    model_config = REFERENCEABLE
    _block_type_name = "Prometheus API"
    _description = "A Prometheus query API: base URL, optional basic auth or bearer token."

    url: str = Field(description="e.g. http://prometheus.monitoring:9090")

    def get_client(self, timeout: float = 10.0) -> httpx.Client:
        """An httpx client for the API; credentials are unwrapped only here."""
        return api_client("PrometheusAPI", self.url.rstrip("/"), username=self.username, password=self.password,
                          bearer_token=self.bearer_token, verify_tls=self.verify_tls, timeout=timeout)
