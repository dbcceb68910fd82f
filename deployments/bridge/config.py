"""The bridge's settings: routes, credentials and the limits of run creation."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import SecretStr

from deployments.bridge.auth import MIN_SECRET_LENGTH
from deployments.routes import CompiledRoute

DEFAULT_MAX_BODY = 1024 * 1024


@dataclass
class BridgeConfig:
    routes: list[CompiledRoute]
    tokens: list[SecretStr] = field(default_factory=list)
    basic_users: dict[str, SecretStr] = field(default_factory=dict)
    max_body_bytes: int = DEFAULT_MAX_BODY
    dedup_cache_size: int = 100_000
    api_concurrency: int = 4  # run creations in flight against the Prefect API at once
    respond_within: float = 0.03  # seconds; slower creations finish in the background (listed as pending)
    retry_for: float = 900.0  # seconds a background creation is retried before it is reported as failed
    retry_backoff: float = 1.0  # first wait between background attempts; doubles up to 30 s

    def __post_init__(self) -> None:
        if not self.tokens and not self.basic_users:
            raise ValueError("the bridge needs a bearer token or basic-auth users: it never accepts anonymous calls")
        for secret in [*self.tokens, *self.basic_users.values()]:
            if len(secret.get_secret_value()) < MIN_SECRET_LENGTH:
                raise ValueError(f"bridge token/password shorter than {MIN_SECRET_LENGTH} characters: use a random "
                                 "one (openssl rand -base64 32)")

    def __repr__(self) -> str:  # no secrets in reprs
        return f"BridgeConfig(routes={len(self.routes)}, tokens={len(self.tokens)}, users={sorted(self.basic_users)})"
