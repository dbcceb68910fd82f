"""Alertmanager API Block: where Alertmanager is and how to authenticate (API v2: silences and alerts)."""

from __future__ import annotations

import httpx
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from tasks.errors import ConfigurationError


class AlertmanagerAPI(Block):
    """An Alertmanager's HTTP API v2 (``/api/v2/silences``, ``/api/v2/alerts``)."""

    _block_type_name = "Alertmanager API"
    _description = "An Alertmanager: base URL, optional basic auth or bearer token (API v2)."

    url: str = Field(description="e.g. http://alertmanager.monitoring:9093")
    username: str | None = Field(default=None, description="Basic auth user (with password).")
    password: SecretStr | None = None
    bearer_token: SecretStr | None = Field(default=None, description="Sent as 'Authorization: Bearer ...'.")
    verify_tls: bool = True

    def describe(self) -> str:
        return self.url.rstrip("/")

    def get_client(self, timeout: float = 10.0) -> httpx.Client:
        """An httpx client for the API v2; credentials are unwrapped only here."""
        if self.bearer_token is not None and self.password is not None:
            raise ConfigurationError("AlertmanagerAPI: give a bearer token or basic auth, not both")
        headers: dict[str, str] = {}
        auth = None
        if self.bearer_token is not None:
            headers["Authorization"] = f"Bearer {self.bearer_token.get_secret_value()}"
        elif self.password is not None:
            auth = httpx.BasicAuth(self.username or "", self.password.get_secret_value())
        return httpx.Client(base_url=self.url.rstrip("/") + "/api/v2", headers=headers, auth=auth,
                            timeout=timeout, verify=self.verify_tls)
