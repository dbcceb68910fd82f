"""Alertmanager API Block: where Alertmanager is and how to authenticate (API v2: silences and alerts)."""

from __future__ import annotations

import httpx
from pydantic import Field

from blocks._reference import REFERENCEABLE
from blocks.http_auth import HttpApiBlock, api_client


class AlertmanagerAPI(HttpApiBlock):
    """An Alertmanager's HTTP API v2 (``/api/v2/silences``, ``/api/v2/alerts``)."""

    model_config = REFERENCEABLE
    _block_type_name = "Alertmanager API"
    _description = "An Alertmanager: base URL, optional basic auth or bearer token (API v2)."

    url: str = Field(description="e.g. http://alertmanager.monitoring:9093")

    def get_client(self, timeout: float = 10.0) -> httpx.Client:
        """An httpx client for the API v2; credentials are unwrapped only here."""
        return api_client("AlertmanagerAPI", self.url.rstrip("/") + "/api/v2", username=self.username,
                          password=self.password, bearer_token=self.bearer_token, verify_tls=self.verify_tls,
                          timeout=timeout)
