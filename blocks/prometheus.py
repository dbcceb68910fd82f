"""Prometheus HTTP API Block: where the server is and how to authenticate (for a runbook's metric checks)."""

from __future__ import annotations

import httpx
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from tasks.errors import ConfigurationError


class PrometheusAPI(Block):
    """A Prometheus (or compatible: Thanos, Mimir, VictoriaMetrics) query endpoint."""

    _block_type_name = "Prometheus API"
    _description = "A Prometheus query API: base URL, optional basic auth or bearer token."

    url: str = Field(description="e.g. http://prometheus.monitoring:9090")
    username: str | None = Field(default=None, description="Basic auth user (with password).")
    password: SecretStr | None = None
    bearer_token: SecretStr | None = Field(default=None, description="Sent as 'Authorization: Bearer ...'.")
    verify_tls: bool = True

    def describe(self) -> str:
        return self.url.rstrip("/")

    def get_client(self, timeout: float = 10.0) -> httpx.Client:
        """An httpx client for the API; credentials are unwrapped only here."""
        if self.bearer_token is not None and self.password is not None:
            raise ConfigurationError("PrometheusAPI: give a bearer token or basic auth, not both")
        headers: dict[str, str] = {}
        auth = None
        if self.bearer_token is not None:
            headers["Authorization"] = f"Bearer {self.bearer_token.get_secret_value()}"
        elif self.password is not None:
            auth = httpx.BasicAuth(self.username or "", self.password.get_secret_value())
        return httpx.Client(base_url=self.url.rstrip("/"), headers=headers, auth=auth, timeout=timeout,
                            verify=self.verify_tls)
