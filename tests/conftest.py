"""Real services for the tests, started on loopback only when a test asks for them.

Nothing here is autouse: a test of pure code starts no server and no Prefect API. A missing binary
(initdb, redis-server, weed) is a fixture error that says what to install, never a skip.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import pytest

from deployments.sandbox import SeaweedS3
from tasks.scratch import ScratchPostgres, ScratchRedis
from tests.faults import FaultyProxy

S3_BUCKET = "runbooks-test"


@pytest.fixture(scope="session")
def pg() -> Iterator[ScratchPostgres]:
    """One PostgreSQL cluster for the session (fsync on: it holds the source data of backups)."""
    with ScratchPostgres(password=secrets.token_urlsafe(16)) as server:
        yield server


@pytest.fixture
def fresh_pg() -> Iterator[ScratchPostgres]:
    """A new, empty cluster per test: a restore target (fsync off)."""
    with ScratchPostgres(password=secrets.token_urlsafe(16), fast=True) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[ScratchRedis]:
    """One password-protected redis-server for the session."""
    with ScratchRedis(password=secrets.token_urlsafe(16)) as server:
        yield server


@pytest.fixture
def scratch_redis() -> Iterator[ScratchRedis]:
    """A new, empty password-protected redis-server per test: a restore target."""
    with ScratchRedis(password=secrets.token_urlsafe(16)) as server:
        yield server


@pytest.fixture(scope="session")
def s3() -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 endpoint with the bucket ``s3.bucket`` (~3.5 s to start, ~3 s to stop)."""
    with SeaweedS3(bucket=S3_BUCKET) as server:
        yield server


@pytest.fixture
def faulty_proxy() -> Iterator[Callable[[str, int], FaultyProxy]]:
    """Factory: ``faulty_proxy(host, port)`` gives a started proxy, stopped at the end of the test."""
    proxies: list[FaultyProxy] = []

    def make(host: str, port: int) -> FaultyProxy:
        proxy = FaultyProxy(host, port).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API and database, entered once per session by the first test that asks."""
    # Imported here: importing Prefect alone costs seconds that tests of pure code must not pay.
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
