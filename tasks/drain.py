"""Draining before a change: poll how much work is in flight (an app's active-work count over HTTP, or a
read-only SQL query) until it is 0 or a timeout passes. The caller decides what a timeout means."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.app import AppEndpoint
from blocks.errors import ConfigurationError, RunbookError
from blocks.postgres import PostgresConnection
from tasks.log import run_logger


class DrainTimeout(RunbookError):
    """Work was still in flight when the drain timeout passed."""


def count_of(body: Any, field: str) -> int:
    """The active-work count in an answer: a bare number, or ``field`` of a JSON object (dots for nesting)."""
    value = body
    if not isinstance(body, (int, float)):
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                raise RunbookError(f"active-work answer has no {field!r}: {str(body)[:200]}")
            value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise RunbookError(f"active-work count {value!r} is not a non-negative number")
    return int(value)


def _app_count(client: httpx.Client, app: AppEndpoint, path: str, field: str) -> int:
    response = client.get(path)
    if not response.is_success:
        raise RunbookError(f"{app.describe()}{path} answered HTTP {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        body = response.text.strip()
        try:
            body = float(body)
        except ValueError:
            raise RunbookError(f"{app.describe()}{path}: not JSON and not a number") from None
    return count_of(body, field)


def _sql_count(pg: PostgresConnection, query: str) -> int:
    # the query runs read-only: a typo cannot change anything
    with pg.connect(autocommit=False, options="-c default_transaction_read_only=on") as conn:
        row = conn.execute(query).fetchone()  # type: ignore[arg-type]
        conn.rollback()
    if not row or len(row) != 1:
        raise ConfigurationError("the drain query must return one row with one number")
    return count_of(row[0], "")


@dataclass(frozen=True)
class Drained:
    drained: bool
    last_count: int
    polls: int
    seconds: float
    source: str


@task(cache_policy=NO_CACHE)
def wait_until_drained(*, app: AppEndpoint | None = None, path: str = "", field: str = "active",
                       postgres: PostgresConnection | None = None, query: str = "", timeout_seconds: float = 300,
                       interval_seconds: float = 2) -> Drained:
    """Poll the active-work count until it is 0 (drained) or ``timeout_seconds`` pass (not drained)."""
    if (app is None or not path) == (postgres is None or not query):
        raise ConfigurationError("drain needs exactly one of: the app's active-work path, or a SQL query")
    source = f"{app.describe()}{path}" if app is not None and path else f"SQL on {postgres.describe()}"  # type: ignore[union-attr]
    started = time.monotonic()
    polls = 0
    log = run_logger()
    client = app.get_client(timeout=min(10.0, max(interval_seconds, 1.0))) if app is not None and path else None
    try:
        while True:
            polls += 1
            try:
                count = _app_count(client, app, path, field) if client is not None else _sql_count(postgres, query)  # type: ignore[arg-type]
            except (httpx.HTTPError, psycopg.OperationalError) as exc:
                raise RunbookError(f"active work at {source} not readable: {type(exc).__name__}") from None
            except psycopg.Error as exc:
                raise ConfigurationError(f"the drain query failed: {str(exc).strip()[:200]}") from None
            seconds = round(time.monotonic() - started, 2)
            if count == 0:
                log.info("drained: no active work at %s after %.1f s (%d polls)", source, seconds, polls)
                return Drained(True, 0, polls, seconds, source)
            if seconds + interval_seconds > timeout_seconds:
                log.warning("not drained: %d still active at %s after %.0f s", count, source, timeout_seconds)
                return Drained(False, count, polls, seconds, source)
            time.sleep(interval_seconds)
    finally:
        if client is not None:
            client.close()
