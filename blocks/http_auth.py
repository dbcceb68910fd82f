"""One way for a Block of an HTTP API (Prometheus, Alertmanager) to build its client: basic auth or a bearer
token, unwrapped only here."""

from __future__ import annotations

import httpx
from pydantic import SecretStr

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
