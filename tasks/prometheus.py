"""Prometheus checks: a PromQL query that must stay at or below a threshold for a while (the analysis the
alert rules imply, e.g. the error ratio below 1 % for 60 s after a rollback)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from blocks.errors import ConfigurationError, ConnectionFailed, RunbookError
from blocks.prometheus import PrometheusAPI
from tasks.log import run_logger


class MetricCheck(BaseModel):
    """One check: every series of ``query`` stays <= ``max`` at every evaluation for ``for_seconds``."""

    query: str = Field(min_length=1, description="PromQL, e.g. sum(rate(http_requests_total{code=~'5..'}[1m])) / "
                                                 "sum(rate(http_requests_total[1m]))")
    max: float = Field(description="Highest acceptable value.")
    for_seconds: float = Field(default=60, ge=0, description="How long it must hold (evaluated every interval).")
    name: str = Field(default="", description="Shown in the report; default: the query.")


class MetricCheckFailed(RunbookError):
    """A Prometheus check was above its threshold (or had no data); the message has the measured values."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    query: str
    max: float
    passed: bool
    values: list[float]  # the highest value of each evaluation
    worst: float | None
    evaluations: int
    detail: str


def query_instant(client: httpx.Client, prometheus: PrometheusAPI, query: str) -> list[float]:
    """Values of an instant query (one per series); scalars count as one series."""
    try:
        response = client.get("/api/v1/query", params={"query": query})
    except httpx.HTTPError as exc:
        raise ConnectionFailed(f"Prometheus at {prometheus.describe()}: {type(exc).__name__}") from None
    if response.status_code in (401, 403):
        raise ConfigurationError(f"Prometheus at {prometheus.describe()} refused the credentials "
                                 f"(HTTP {response.status_code})")
    try:
        body = response.json()
    except ValueError:
        raise RunbookError(f"Prometheus at {prometheus.describe()} answered HTTP {response.status_code}, "
                           "not JSON") from None
    if body.get("status") != "success":
        if body.get("errorType") == "bad_data":
            raise ConfigurationError(f"PromQL {query!r} rejected: {body.get('error', '')}")
        raise RunbookError(f"Prometheus query {query!r} failed: {body.get('errorType')}: {body.get('error')}")
    data = body["data"]
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    if data["resultType"] == "vector":
        return [float(sample["value"][1]) for sample in data["result"]]
    raise ConfigurationError(f"PromQL {query!r} gives a {data['resultType']}; a check needs an instant vector")


@task(cache_policy=NO_CACHE)
def check_metric(prometheus: PrometheusAPI, check: MetricCheck, *, interval_seconds: float = 5) -> CheckResult:
    """Evaluate the query every interval for ``for_seconds`` (at least once); above ``max``, NaN or no data
    fails at once with the values measured so far."""
    name = check.name or check.query
    values: list[float] = []
    started = time.monotonic()
    with prometheus.get_client() as client:
        while True:
            series = query_instant(client, prometheus, check.query)
            if not series:
                result = CheckResult(name, check.query, check.max, False, values, max(values, default=None),
                                     len(values) + 1, "no data (the query returned no series)")
                break
            worst = max(series)
            values.append(worst)
            if math.isnan(worst) or worst > check.max:
                result = CheckResult(name, check.query, check.max, False, values, worst, len(values),
                                     f"{worst:g} > {check.max:g}" if not math.isnan(worst) else "NaN")
                break
            if time.monotonic() - started >= check.for_seconds:
                result = CheckResult(name, check.query, check.max, True, values, max(values), len(values),
                                     f"<= {check.max:g} for {time.monotonic() - started:.0f} s")
                break
            time.sleep(min(interval_seconds, max(0.0, check.for_seconds - (time.monotonic() - started))) or 0.01)
    log = run_logger()
    if result.passed:
        log.info("check %s passed: worst %g <= %g over %d evaluation(s)", name, result.worst, check.max,
                 result.evaluations)
    else:
        log.warning("check %s FAILED: %s (values %s)", name, result.detail, [round(v, 6) for v in values])
    return result
