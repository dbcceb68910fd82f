"""Alertmanager steps (API v2): create a silence for a window that always ends by itself, expire it, and list
the alerts a silence is suppressing.

Matchers are written as in amtool and PromQL: ``alertname="HighErrorRate"``, ``service=~"api|worker"``,
``env!=staging``, ``instance!~"db-.*"`` (quotes optional). A silence always has an end time: a run that
dies mid-window leaves a silence that ends on its own at the window's end plus the margin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.alertmanager import AlertmanagerAPI
from blocks.errors import ConfigurationError, ConnectionFailed, RunbookError
from tasks.log import run_logger

_MATCHER = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*$")
# Alertmanager refuses silences longer than this nowhere; the runbook refuses them so a typo in the expected
# duration cannot hide alerts for weeks.
MAX_SILENCE = timedelta(hours=24)


class SilenceFailed(RunbookError):
    """Alertmanager refused or lost a silence; the message says which and what is left."""


# -- pure ------------------------------------------------------------------------------------------------------


def parse_matcher(text: str) -> dict[str, Any]:
    """``name="value"`` / ``name!=value`` / ``name=~"re"`` / ``name!~re`` -> an API v2 matcher."""
    m = _MATCHER.match(text or "")
    if not m:
        raise ConfigurationError(f"silence matcher {text!r}: expected NAME=VALUE, NAME!=VALUE, NAME=~REGEX or "
                                 "NAME!~REGEX")
    name, op, value = m.groups()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if op in ("=~", "!~"):
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigurationError(f"silence matcher {text!r}: bad regex ({exc})") from None
    return {"name": name, "value": value, "isRegex": op in ("=~", "!~"), "isEqual": op in ("=", "=~")}


def matchers_of(texts: list[str]) -> list[dict[str, Any]]:
    """Every matcher parsed; at least one must match something positively (Alertmanager's own rule: a silence
    made only of negative or empty-matching matchers would silence everything)."""
    if not texts:
        raise ConfigurationError("a silence needs at least one matcher, e.g. alertname=\"HighErrorRate\"")
    parsed = [parse_matcher(t) for t in texts]
    if not any(m["isEqual"] and not re.fullmatch(m["value"] if m["isRegex"] else re.escape(m["value"]), "")
               for m in parsed):
        raise ConfigurationError(f"silence matchers {texts}: at least one must be a positive matcher that does "
                                 "not match the empty string (a silence of everything is refused)")
    return parsed


def matcher_text(matcher: dict[str, Any]) -> str:
    op = ("=" if matcher["isEqual"] else "!=") if not matcher["isRegex"] else ("=~" if matcher["isEqual"] else "!~")
    return f'{matcher["name"]}{op}"{matcher["value"]}"'


def silence_end(start: datetime, expected_minutes: float, margin_minutes: float) -> datetime:
    """The silence's end: the window's expected end plus a margin; bounded by MAX_SILENCE."""
    if expected_minutes <= 0 or margin_minutes < 0:
        raise ConfigurationError("expected duration must be > 0 and the margin >= 0 minutes")
    length = timedelta(minutes=expected_minutes + margin_minutes)
    if length > MAX_SILENCE:
        raise ConfigurationError(f"a silence of {length} is longer than {MAX_SILENCE}: split the window")
    return start + length


def _rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- HTTP ------------------------------------------------------------------------------------------------------


def _call(am: AlertmanagerAPI, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        with am.get_client() as client:
            response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise ConnectionFailed(f"Alertmanager at {am.describe()}: {type(exc).__name__}") from None
    if response.status_code in (401, 403):
        raise ConfigurationError(f"Alertmanager at {am.describe()} refused the credentials "
                                 f"(HTTP {response.status_code})")
    if response.status_code >= 500:
        raise ConnectionFailed(f"Alertmanager at {am.describe()}: {method} {path} answered "
                               f"HTTP {response.status_code}: {response.text[:200]}")
    return response


@dataclass(frozen=True)
class Silence:
    id: str
    state: str  # active, pending, expired
    starts_at: datetime
    ends_at: datetime
    matchers: list[str] = field(default_factory=list)
    created_by: str = ""
    comment: str = ""


def _silence_of(body: dict[str, Any]) -> Silence:
    return Silence(id=body["id"], state=(body.get("status") or {}).get("state", "?"),
                   starts_at=_parse_time(body["startsAt"]), ends_at=_parse_time(body["endsAt"]),
                   matchers=[matcher_text(m) for m in body.get("matchers") or []],
                   created_by=body.get("createdBy", ""), comment=body.get("comment", ""))


@task(retries=2, retry_delay_seconds=[1, 3], cache_policy=NO_CACHE)
def read_silence(am: AlertmanagerAPI, silence_id: str) -> Silence:
    """The silence as Alertmanager has it now."""
    response = _call(am, "GET", f"/silence/{silence_id}")
    if response.status_code == 404:
        raise SilenceFailed(f"Alertmanager at {am.describe()} has no silence {silence_id}")
    if not response.is_success:
        raise SilenceFailed(f"Alertmanager at {am.describe()}: silence {silence_id}: HTTP {response.status_code}")
    return _silence_of(response.json())


@task(retries=2, retry_delay_seconds=[1, 3], cache_policy=NO_CACHE)
def create_silence(am: AlertmanagerAPI, matchers: list[str], ends_at: datetime, *, created_by: str,
                   comment: str) -> Silence:
    """Silence the alerts ``matchers`` select from now until ``ends_at`` (never open-ended)."""
    parsed = matchers_of(matchers)
    now = datetime.now(UTC)
    if ends_at <= now:
        raise ConfigurationError(f"silence end {ends_at} is not in the future")
    if ends_at - now > MAX_SILENCE:
        raise ConfigurationError(f"silence end {ends_at} is more than {MAX_SILENCE} away")
    body = {"matchers": parsed, "startsAt": _rfc3339(now), "endsAt": _rfc3339(ends_at),
            "createdBy": created_by or "runbooks", "comment": comment or "maintenance window"}
    response = _call(am, "POST", "/silences", json=body)
    if not response.is_success:
        wanted = [matcher_text(m) for m in parsed]
        raise ConfigurationError(f"Alertmanager at {am.describe()} refused the silence {wanted}: HTTP "
                                 f"{response.status_code}: {response.text.strip()[:300]}")
    silence = read_silence.fn(am, response.json()["silenceID"])
    run_logger().info("silence %s at %s: %s until %s (%s)", silence.id, am.describe(), ", ".join(silence.matchers),
                      _rfc3339(silence.ends_at), silence.state)
    return silence


@task(retries=2, retry_delay_seconds=[1, 3], cache_policy=NO_CACHE)
def expire_silence(am: AlertmanagerAPI, silence_id: str) -> Silence:
    """End the silence now (an already expired one is left as it is); returns it as Alertmanager has it."""
    current = read_silence.fn(am, silence_id)
    if current.state != "expired":
        response = _call(am, "DELETE", f"/silence/{silence_id}")
        if not response.is_success:
            raise SilenceFailed(f"Alertmanager at {am.describe()} did not expire silence {silence_id}: HTTP "
                                f"{response.status_code}: {response.text.strip()[:200]}; it ends by itself at "
                                f"{_rfc3339(current.ends_at)}")
        current = read_silence.fn(am, silence_id)
    if current.state != "expired":
        raise SilenceFailed(f"silence {silence_id} at {am.describe()} is still {current.state} after expiring it; "
                            f"it ends by itself at {_rfc3339(current.ends_at)}")
    run_logger().info("silence %s at %s expired", silence_id, am.describe())
    return current


@dataclass(frozen=True)
class AlertSeen:
    labels: dict[str, str]
    state: str  # active, suppressed, unprocessed
    silenced_by: list[str]
    inhibited_by: list[str]

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "")


@task(retries=2, retry_delay_seconds=[1, 3], cache_policy=NO_CACHE)
def list_alerts(am: AlertmanagerAPI, matchers: list[str] | None = None) -> list[AlertSeen]:
    """Every alert Alertmanager holds (active, silenced and inhibited), optionally filtered by matchers."""
    params: list[tuple[str, str]] = [("active", "true"), ("silenced", "true"), ("inhibited", "true"),
                                     ("unprocessed", "true")]
    params += [("filter", matcher_text(m)) for m in (parse_matcher(t) for t in matchers or [])]
    response = _call(am, "GET", "/alerts", params=params)
    if not response.is_success:
        raise RunbookError(f"Alertmanager at {am.describe()}: alerts: HTTP {response.status_code}")
    return [AlertSeen(labels=dict(a.get("labels") or {}), state=(a.get("status") or {}).get("state", "?"),
                      silenced_by=list((a.get("status") or {}).get("silencedBy") or []),
                      inhibited_by=list((a.get("status") or {}).get("inhibitedBy") or []))
            for a in response.json()]


def suppressed_by(alerts: list[AlertSeen], silence_id: str) -> list[AlertSeen]:
    """The alerts that silence is keeping from every receiver."""
    return [a for a in alerts if a.state == "suppressed" and silence_id in a.silenced_by]
