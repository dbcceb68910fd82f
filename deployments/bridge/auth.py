"""Who may call the bridge: a bearer token or basic-auth users, read from files or the environment, never argv."""

from __future__ import annotations

import base64
import hmac
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

if TYPE_CHECKING:
    from deployments.bridge.config import BridgeConfig

MIN_SECRET_LENGTH = 16  # refuses placeholders like the REPLACE-ME of deployments/k8s/bridge.yaml


def read_secret_file(path: str) -> str:
    text = Path(path).read_text().strip()
    if not text:
        raise ValueError(f"{path} is empty")
    return text


def parse_basic_auth_file(text: str) -> dict[str, SecretStr]:
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"basic-auth file line {number}: expected user:password")
        users[user] = SecretStr(password)
    return users


def authorized(header: str | None, config: BridgeConfig) -> bool:
    """Bearer token or basic auth, every candidate compared in constant time (no early exit on a match)."""
    if not header:
        return False
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    ok = False
    if scheme.lower() == "bearer" and credentials:
        given = credentials.encode()
        for token in config.tokens:
            ok |= hmac.compare_digest(given, token.get_secret_value().encode())
    elif scheme.lower() == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode()
        except ValueError:  # binascii.Error, non-ASCII header text, UnicodeDecodeError
            return False
        user, sep, password = decoded.partition(":")
        if not sep:
            return False
        for name, secret in config.basic_users.items():
            same_user = hmac.compare_digest(user.encode(), name.encode())
            same_password = hmac.compare_digest(password.encode(), secret.get_secret_value().encode())
            ok |= same_user and same_password
    return ok
