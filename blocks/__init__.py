"""The project's Prefect Blocks, by class name; `prefect block register -m blocks` registers every one of them.

The classes load on first use (PEP 562 ``__getattr__``): ``import blocks.postgres`` does not pay for the
Kubernetes client. ``dir(blocks)`` lists them, which is what Prefect's ``block register -m`` walks.
"""

from __future__ import annotations

import importlib
from typing import Any

# class name -> module: every Block type the runbooks take, in the order the Blocks catalog shows them
BLOCK_TYPES = {
    "BackupStore": "blocks.store",
    "PostgresConnection": "blocks.postgres",
    "RedisConnection": "blocks.redis",
    "AppEndpoint": "blocks.app",
    "KubernetesCluster": "blocks.kubernetes",
    "SSHHost": "blocks.ssh",
    "PrometheusAPI": "blocks.prometheus",
    "AlertmanagerAPI": "blocks.alertmanager",
    "WeaviateConnection": "blocks.weaviate",
}

__all__ = list(BLOCK_TYPES)


def __getattr__(name: str) -> Any:
    module = BLOCK_TYPES.get(name)
    if module is None:
        raise AttributeError(f"module 'blocks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *BLOCK_TYPES})
