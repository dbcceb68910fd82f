"""What the Blocks of an HTTP API (Prometheus, Alertmanager) share: the fields (URL, basic auth or a bearer
token, TLS check) and one way to build the client, with the credentials unwrapped only here."""

from __future__ import annotations

import httpx
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from blocks._secret import OptionalSecret
from blocks.errors import ConfigurationError


def api_client(what: str, base_url: str, *, username: str | None, password: SecretStr | None,
               bearer_token: SecretStr | None, verify_tls: bool, timeout: float) -> httpx.Client:
    """An httpx client for ``base_url`` with the Block's credentials; both kinds at once is an error."""
    if bearer_token is not None and password is not None:
        raise ConfigurationError(f"{what}: give a bearer token or basic auth, not both")
    headers: dict[str, str] = {}
    auth = None
    if bearer_token is not None:
        headers["Authorization"] = f"Bearer {bearer_token.get_secret_value()}"
    elif password is not None:
        auth = httpx.BasicAuth(username or "", password.get_secret_value())
    return httpx.Client(base_url=base_url, headers=headers, auth=auth, timeout=timeout, verify=verify_tls)


class HttpApiBlock(Block):
    """The fields of an HTTP API's Block; a subclass sets ``url``'s description and builds its client with
    ``api_client``. Not a Block type of its own (blocks.BLOCK_TYPES lists the registered ones)."""

    url: str = Field(description="The API's base URL.")
    username: str | None = Field(default=None, description="Basic auth user (with password).")
    password: OptionalSecret = None
    bearer_token: OptionalSecret = Field(default=None, description="Sent as 'Authorization: Bearer ...'.")
    verify_tls: bool = True

    def describe(self) -> str:
        return self.url.rstrip("/")
