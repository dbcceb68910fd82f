"""Alertmanager API Block: where Alertmanager is and how to authenticate (API v2: silences and alerts)."""

from __future__ import annotations

import httpx
from prefect.blocks.core import Block
from pydantic import Field

from blocks._reference import REFERENCEABLE
from blocks._secret import OptionalSecret
from blocks.http_auth import api_client


class AlertmanagerAPI(Block):
    """An Alertmanager's HTTP API v2 (``/api/v2/silences``, ``/api/v2/alerts``)."""

    model_config = REFERENCEABLE
    _block_type_name = "Alertmanager API"
    _description = "An Alertmanager: base URL, optional basic auth or bearer token (API v2)."

    url: str = Field(description="e.g. http://alertmanager.monitoring:9093")
    username: str | None = Field(default=None, description="Basic auth user (with password).")
    password: OptionalSecret = None
    bearer_token: OptionalSecret = Field(default=None, description="Sent as 'Authorization: Bearer ...'.")
    verify_tls: bool = True

    def describe(self) -> str:
        return self.url.rstrip("/")

    def get_client(self, timeout: float = 10.0) -> httpx.Client:
        """An httpx client for the API v2; credentials are unwrapped only here."""
        return api_client("AlertmanagerAPI", self.url.rstrip("/") + "/api/v2", username=self.username,
                          password=self.password, bearer_token=self.bearer_token, verify_tls=self.verify_tls,
                          timeout=timeout)
