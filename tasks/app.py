"""Application steps: maintenance mode on/off and waiting until the app is healthy."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.app import AppEndpoint
from blocks.errors import RunbookError
from tasks.log import run_logger


class AppUnhealthy(RunbookError):
    """The application did not become healthy in time; maintenance mode was left on."""


@task(retries=3, retry_delay_seconds=[1, 3, 5], cache_policy=NO_CACHE)
def set_maintenance(app: AppEndpoint, on: bool) -> None:
    """Switch the app's maintenance mode; a non-2xx answer is an error (and retried)."""
    path = app.maintenance_on_path if on else app.maintenance_off_path
    with app.get_client() as client:
        response = client.request(app.maintenance_method, path)
    if not response.is_success:
        raise RunbookError(f"maintenance {'on' if on else 'off'} at {app.describe()}{path} answered "
                           f"{response.status_code}")
    run_logger().info("maintenance mode %s at %s", "ON" if on else "OFF", app.describe())


@dataclass(frozen=True)
class Health:
    healthy: bool
    attempts: int
    seconds: float
    last_status: str


@task(cache_policy=NO_CACHE)
def wait_until_healthy(app: AppEndpoint, *, timeout_seconds: float = 120, interval_seconds: float = 2,
                       left_as: str = "maintenance mode stays ON") -> Health:
    """Poll the health endpoint until it answers 2xx; raise AppUnhealthy after the timeout (its message ends
    with ``left_as``: what the caller leaves in place)."""
    started = time.monotonic()
    attempts, last = 0, "no answer"
    with app.get_client(timeout=min(10.0, max(interval_seconds, 1.0))) as client:
        while True:
            attempts += 1
            try:
                response = client.get(app.health_path)
                last = f"HTTP {response.status_code}"
                if response.is_success:
                    seconds = round(time.monotonic() - started, 2)
                    run_logger().info("%s healthy after %d check(s), %.1f s", app.describe(), attempts, seconds)
                    return Health(True, attempts, seconds, last)
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            if time.monotonic() - started + interval_seconds > timeout_seconds:
                raise AppUnhealthy(f"{app.describe()}{app.health_path} not healthy after {timeout_seconds:.0f} s "
                                   f"({attempts} checks, last: {last}); {left_as}")
            time.sleep(interval_seconds)
