"""Application endpoint Block: where the app's health check and maintenance switch are, and its token."""

from __future__ import annotations

from typing import Literal

import httpx
from prefect.blocks.core import Block
from pydantic import Field

from blocks._reference import REFERENCEABLE
from blocks._secret import OptionalSecret


class AppEndpoint(Block):
    """The application in front of the data: health check and maintenance mode over HTTP."""

    model_config = REFERENCEABLE
    _block_type_name = "App Endpoint"
    _description = "An application's base URL, health path and maintenance on/off requests."

    base_url: str = Field(description="e.g. https://api.example.com")
    health_path: str = Field(default="/health", description="GET; healthy when it answers 2xx.")
    maintenance_on_path: str = Field(default="/maintenance/on")
    maintenance_off_path: str = Field(default="/maintenance/off")
    maintenance_method: Literal["POST", "PUT", "GET"] = "POST"
    auth_header: str = Field(default="Authorization", description="Header that carries the token.")
    auth_value: OptionalSecret = Field(default=None, description="e.g. 'Bearer <token>'.")
    verify_tls: bool = True

    def describe(self) -> str:
        return self.base_url.rstrip("/")

    def get_client(self, timeout: float = 10.0) -> httpx.Client:
        """An httpx client with the auth header set; the token is unwrapped only here."""
        headers = {}
        if self.auth_value is not None:
            headers[self.auth_header] = self.auth_value.get_secret_value()
        return httpx.Client(base_url=self.base_url.rstrip("/"), headers=headers, timeout=timeout,
                            verify=self.verify_tls)
