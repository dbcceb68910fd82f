"""Every Block type reaches the Blocks catalog: `runbooks serve` registers them, and so does
`prefect block register -m blocks`; optional secrets are one password input in the Block forms."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import blocks

SLUGS = {"backup-store", "postgres-connection", "redis-connection", "app-endpoint", "kubernetes-cluster",
         "ssh-host", "prometheus-api", "alertmanager-api", "weaviate-connection"}


def _registered_slugs() -> set[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {t.slug for t in client.read_block_types()}


def test_blocks_module_lists_every_block_class() -> None:
    from prefect.blocks.core import Block

    found = {getattr(blocks, name).get_block_type_slug() for name in dir(blocks)
             if Block.is_block_class(getattr(blocks, name, None))}
    assert found == SLUGS


def test_serve_registers_every_block_type(prefect_harness: None) -> None:
    from deployments.serve import register_block_types

    assert set(register_block_types()) == SLUGS
    assert SLUGS <= _registered_slugs()


def test_prefect_block_register_m_blocks(prefect_harness: None) -> None:
    from prefect.settings import PREFECT_API_URL

    prefect = Path(sys.executable).parent / "prefect"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    done = subprocess.run([str(prefect), "block", "register", "-m", "blocks"], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parent.parent, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Successfully registered 9 blocks" in done.stdout, done.stdout
    for title in ("App Endpoint", "Postgres Connection", "Weaviate Connection"):
        assert title in done.stdout
    assert SLUGS <= _registered_slugs()


@pytest.mark.parametrize(("block", "field"), [
    ("PostgresConnection", "password"), ("RedisConnection", "password"), ("BackupStore", "secret_access_key"),
    ("AppEndpoint", "auth_value"), ("SSHHost", "password"), ("WeaviateConnection", "api_key"),
    ("AlertmanagerAPI", "bearer_token"), ("PrometheusAPI", "password"),
])
def test_optional_secret_is_one_password_input(block: str, field: str) -> None:
    block_type = getattr(blocks, block)
    schema = block_type.model_json_schema()
    prop = schema["properties"][field]
    assert "anyOf" not in prop
    assert (prop["type"], prop["format"], prop["writeOnly"]) == ("string", "password", True)
    assert field in schema["secret_fields"]
    assert field not in schema.get("required", [])


def test_optional_secret_empty_is_none() -> None:
    from blocks.postgres import PostgresConnection

    assert PostgresConnection(password="").password is None
    assert PostgresConnection(password=None).password is None
    typed = PostgresConnection(password="s3cret-value")
    assert typed.password is not None and typed.password.get_secret_value() == "s3cret-value"
    assert "s3cret-value" not in repr(typed)
