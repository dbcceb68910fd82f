"""Alert -> runbook routing for the Alertmanager bridge: the payload model, the routes file, and the plan.

Everything here is pure (no I/O but parsing text): which route an alert takes, the parameters it
renders, the idempotency key that makes a repeat of the same notification start nothing, and the
cooldown key. The bridge (deployments/bridge/) carries the plan out against the Prefect API.

Routes file (YAML)::

    defaults: {cooldown: 10m, approval_timeout: 24h}
    routes:
      - name: backup-missing                 # unique; part of the idempotency key
        alertname: BackupMissing             # shorthand for the matcher alertname="BackupMissing"
        matchers: ['severity=~"critical|page"', 'env!="staging"']
        deployment: backup/nightly           # flow/deployment
        on: firing                           # firing | resolved | both
        cooldown: 1h                         # per route and rendered parameters; 0 = none
        require_approval: false              # default: true for destructive runbooks
        continue: false                      # like Alertmanager: keep matching later routes
        parameters:
          tags: [alert, "{{ labels.alertname }}"]
          database: "{{ labels.datname | default('app') }}"
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

# -- the Alertmanager webhook payload (version 4) ---------------------------------------------------------

LabelName = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
LabelValue = Annotated[str, StringConstraints(max_length=16384)]


class Alert(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=False)

    status: Literal["firing", "resolved"]
    labels: dict[LabelName, LabelValue]
    annotations: dict[LabelName, LabelValue] = Field(default_factory=dict)
    startsAt: datetime  # noqa: N815 - Alertmanager's field names
    endsAt: datetime | None = None  # noqa: N815
    generatorURL: str = ""  # noqa: N815
    fingerprint: Annotated[str, StringConstraints(min_length=1, max_length=128)]

    @field_validator("startsAt", "endsAt")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("timestamp needs a timezone (Alertmanager sends RFC 3339)")
        return value

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")


class Notification(BaseModel):
    """One POST from Alertmanager: a group of alerts."""

    model_config = ConfigDict(extra="ignore")

    version: Literal["4"]
    groupKey: str  # noqa: N815
    truncatedAlerts: int = Field(default=0, ge=0)  # noqa: N815
    status: Literal["firing", "resolved"]
    receiver: str
    groupLabels: dict[LabelName, LabelValue] = Field(default_factory=dict)  # noqa: N815
    commonLabels: dict[LabelName, LabelValue] = Field(default_factory=dict)  # noqa: N815
    commonAnnotations: dict[LabelName, LabelValue] = Field(default_factory=dict)  # noqa: N815
    externalURL: str = ""  # noqa: N815
    alerts: list[Alert] = Field(max_length=10_000)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char.isprintable():
        return char
    code = ord(char)
    return _ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                                  else f"\\U{code:08x}")


def printable(text: object, limit: int = 200) -> str:
    """``text`` safe for one log line or a JSON answer: control, format and line-separator characters escaped
    (``\\n``, ``\\x1b``, ``\\u2028``) and cut to ``limit`` characters, saying how long it was."""
    value = str(text)
    out = "".join(_escape(c) for c in value[:limit])
    return out if len(value) <= limit else f"{out}...({len(value)} characters)"


def describe_validation_error(exc: ValidationError, limit: int = 5) -> str:
    """A short, input-free reason for a 400: where and what, never the offending value itself. Dict keys
    in the location come from the sender: each is cut and escaped (``printable``)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:limit]:
        where = ".".join(printable(p, 64) for p in err["loc"]) or "body"
        parts.append(f"{where}: {printable(err['msg'], 200)}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# -- label matchers ----------------------------------------------------------------------------------------

_MATCHER = re.compile(r'^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*$')


@dataclass(frozen=True)
class Matcher:
    """One Alertmanager-style label matcher; regexes are anchored as in Alertmanager."""

    label: str
    op: Literal["=", "!=", "=~", "!~"]
    value: str
    regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> Matcher:
        m = _MATCHER.match(text)
        if not m:
            raise ValueError(f'matcher {text!r}: expected label="value", label!="value", label=~"re" or label!~"re"')
        label, op, raw = m.groups()
        value = re.sub(r"\\(.)", r"\1", raw)
        regex = None
        if op in ("=~", "!~"):
            try:
                regex = re.compile(f"(?:{value})", re.DOTALL)
            except re.error as exc:
                raise ValueError(f"matcher {text!r}: bad regular expression: {exc}") from exc
        return cls(label, op, value, regex)  # type: ignore[arg-type]

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.label, "")  # a missing label matches the empty string, as in Alertmanager
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        assert self.regex is not None
        hit = self.regex.fullmatch(actual) is not None
        return hit if self.op == "=~" else not hit


# -- templates ---------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(
    r"\{\{\s*(labels|annotations|alert)\.([A-Za-z_][A-Za-z0-9_]*)"
    r"""(?:\s*\|\s*default\(\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')\s*\))?\s*\}\}"""
)
_ANY_BRACES = re.compile(r"\{\{.*?\}\}", re.DOTALL)
ALERT_FIELDS = ("fingerprint", "status", "startsAt", "generatorURL", "alertname")


class TemplateError(ValueError):
    """A parameter template names a label or annotation the alert does not carry (and has no default)."""


def _check_template(text: str, where: str) -> None:
    stripped = _PLACEHOLDER.sub("", text)
    bad = _ANY_BRACES.search(stripped)
    if bad or any(mark in stripped for mark in ("{{", "}}", "{%", "{#")):
        shown = bad.group(0) if bad else stripped[:80]
        raise ValueError(
            f"{where}: unsupported template {shown!r}: use {{{{ labels.NAME }}}}, "
            f"{{{{ annotations.NAME }}}}, {{{{ alert.FIELD }}}} with FIELD in {', '.join(ALERT_FIELDS)}, "
            "optionally | default('value')"
        )
    for m in _PLACEHOLDER.finditer(text):
        if m.group(1) == "alert" and m.group(2) not in ALERT_FIELDS:
            raise ValueError(f"{where}: alert has no field {m.group(2)!r}; use one of {', '.join(ALERT_FIELDS)}")


def _alert_fields(alert: Alert) -> dict[str, str]:
    return {
        "fingerprint": alert.fingerprint,
        "status": alert.status,
        "startsAt": alert.startsAt.astimezone(UTC).isoformat(),
        "generatorURL": alert.generatorURL,
        "alertname": alert.alertname,
    }


def render(value: Any, alert: Alert) -> Any:
    """Fill ``{{ labels.x }}`` / ``{{ annotations.y }}`` / ``{{ alert.z }}`` in every string of ``value``."""
    sources = {"labels": alert.labels, "annotations": alert.annotations, "alert": _alert_fields(alert)}

    def one(m: re.Match[str]) -> str:
        kind, name, dq, sq = m.groups()
        found = sources[kind].get(name)
        if found is not None:
            return found
        default = dq if dq is not None else sq
        if default is None:
            raise TemplateError(f"the alert has no {kind[:-1] if kind != 'alert' else 'field'} {name!r}")
        return re.sub(r"\\(.)", r"\1", default)

    if isinstance(value, str):
        return _PLACEHOLDER.sub(one, value)
    if isinstance(value, Mapping):
        return {k: render(v, alert) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, alert) for v in value]
    return value


def _walk_strings(value: Any, where: str) -> None:
    if isinstance(value, str):
        _check_template(value, where)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _walk_strings(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _walk_strings(v, f"{where}[{i}]")


# -- routes ------------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> float:
    """``90``, ``"90s"``, ``"10m"``, ``"2h"``, ``"1d"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"duration {value!r}: expected seconds or a string like 10m")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration {value!r} is negative")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"duration {value!r}: expected seconds or a number with ms, s, m, h or d")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


Duration = Annotated[float, Field(ge=0)]


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")]
    deployment: Annotated[str, StringConstraints(pattern=r"^[^/\s]+/[^/\s]+$")]
    alertname: str | None = None
    matchers: list[str] = Field(default_factory=list)
    on: Literal["firing", "resolved", "both"] = "firing"
    cooldown: float | None = None  # seconds; None: the file's default
    require_approval: bool | None = None  # None: destructive runbooks need approval
    approval_timeout: float | None = None
    continue_: bool = Field(default=False, alias="continue")
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("cooldown", "approval_timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        return None if value is None else parse_duration(value)

    @field_validator("matchers")
    @classmethod
    def _matchers(cls, value: list[str]) -> list[str]:
        for text in value:
            Matcher.parse(text)
        return value

    def compiled_matchers(self) -> list[Matcher]:
        found = [Matcher.parse(text) for text in self.matchers]
        if self.alertname is not None:
            found.insert(0, Matcher("alertname", "=", self.alertname))
        return found


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cooldown: float = 0.0
    approval_timeout: float = 24 * 3600.0

    @field_validator("cooldown", "approval_timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)


class RoutesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    defaults: Defaults = Field(default_factory=Defaults)
    routes: list[Route]


@dataclass(frozen=True)
class CompiledRoute:
    """A route with everything resolved: matchers compiled, defaults and approval decided."""

    name: str
    deployment: str
    matchers: tuple[Matcher, ...]
    on: str
    cooldown: float
    require_approval: bool
    approval_timeout: float
    continue_: bool
    parameters: Mapping[str, Any]

    def matches(self, alert: Alert) -> bool:
        return all(m.matches(alert.labels) for m in self.matchers)

    def acts_on(self, status: str) -> bool:
        return self.on == "both" or self.on == status


class RoutesError(ValueError):
    """The routes file is wrong; the message says which route and what to change."""


def _yaml_on_key(data: Any) -> Any:
    """YAML 1.1 reads a bare ``on:`` key as the boolean True; give routes their ``on`` back."""
    if isinstance(data, Mapping) and isinstance(data.get("routes"), list):
        data = dict(data)
        data["routes"] = [
            {("on" if k is True else k): v for k, v in r.items()} if isinstance(r, Mapping) else r
            for r in data["routes"]
        ]
    return data


def compile_routes(data: Any, destructive: Callable[[str], bool | None]) -> list[CompiledRoute]:
    """Validate a parsed routes file. ``destructive(name)``: True/False for known deployments, None if unknown."""
    data = _yaml_on_key(data)
    try:
        parsed = RoutesFile.model_validate(data)
    except ValidationError as exc:
        raise RoutesError(f"routes file: {describe_validation_error(exc, limit=10)}") from exc
    seen: set[str] = set()
    compiled = []
    for route in parsed.routes:
        if route.name in seen:
            raise RoutesError(f"routes file: route name {route.name!r} is used twice (it keys deduplication)")
        seen.add(route.name)
        if not route.compiled_matchers():
            raise RoutesError(f"route {route.name}: give alertname or at least one matcher (it would match all)")
        try:
            _walk_strings(route.parameters, f"route {route.name}: parameters")
        except ValueError as exc:
            raise RoutesError(str(exc)) from exc
        approval = route.require_approval
        if approval is None:
            kind = destructive(route.deployment)
            if kind is None:
                raise RoutesError(
                    f"route {route.name}: deployment {route.deployment!r} is not in the runbook registry, so "
                    "whether it is destructive is unknown: set require_approval: true or false explicitly"
                )
            approval = kind
        compiled.append(CompiledRoute(
            name=route.name, deployment=route.deployment, matchers=tuple(route.compiled_matchers()),
            on=route.on,
            cooldown=parsed.defaults.cooldown if route.cooldown is None else route.cooldown,
            require_approval=approval,
            approval_timeout=route.approval_timeout or parsed.defaults.approval_timeout,
            continue_=route.continue_, parameters=route.parameters,
        ))
    return compiled


def load_routes(text: str, destructive: Callable[[str], bool | None]) -> list[CompiledRoute]:
    """Parse and validate a routes file's YAML text."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RoutesError(f"routes file is not valid YAML: {exc}") from exc
    return compile_routes(data, destructive)


def registry_destructive(name: str) -> bool | None:
    """Whether a deployment of the runbook registry is destructive (None: not in the registry)."""
    from deployments.registry import by_name

    runbook = by_name().get(name)
    return None if runbook is None else runbook.destructive


# -- the plan ----------------------------------------------------------------------------------------------


def dedup_key(route: str, alert: Alert) -> str:
    """Idempotency key of one notification of one alert through one route: fingerprint, status, startsAt.

    Alertmanager repeats a notification with the same three (repeat_interval, retries, HA peers); a
    Prefect flow-run idempotency key turns every repeat into the run the first one created.
    """
    starts = alert.startsAt.astimezone(UTC).isoformat()
    raw = "\x1f".join(("alertmanager", route, alert.fingerprint, alert.status, starts))
    return "alertmanager-" + hashlib.sha256(raw.encode()).hexdigest()[:40]


def cooldown_key(route: str, parameters: Mapping[str, Any]) -> str:
    """Cooldown applies per route and rendered parameters: two targets of one route cool down apart."""
    return route + ":" + hashlib.sha256(json.dumps(parameters, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Trigger:
    """Start ``deployment`` for ``alert`` through ``route`` (unless it is a repeat or cooling down)."""

    route: CompiledRoute
    alert: Alert
    parameters: dict[str, Any]
    idempotency_key: str

    @property
    def cooldown_key(self) -> str:
        return cooldown_key(self.route.name, self.parameters)


@dataclass(frozen=True)
class Skip:
    fingerprint: str
    alertname: str
    reason: str
    route: str | None = None
    run_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"fingerprint": self.fingerprint, "alertname": self.alertname, "reason": self.reason}
        if self.route:
            out["route"] = self.route
        if self.run_id:
            out["flow_run_id"] = self.run_id
        return out


def plan(notification: Notification, routes: Sequence[CompiledRoute]) -> list[Trigger | Skip]:
    """For each alert: the routes it takes (first match, more with ``continue``) and what each would start."""
    out: list[Trigger | Skip] = []
    for alert in notification.alerts:
        matched = False
        for route in routes:
            if not route.matches(alert):
                continue
            matched = True
            if not route.acts_on(alert.status):
                out.append(Skip(alert.fingerprint, alert.alertname,
                                f"route acts on {route.on} notifications, this one is {alert.status}", route.name))
            else:
                try:
                    params = render(dict(route.parameters), alert)
                except TemplateError as exc:
                    out.append(Skip(alert.fingerprint, alert.alertname, f"parameters: {exc}", route.name))
                else:
                    out.append(Trigger(route, alert, params, dedup_key(route.name, alert)))
            if not route.continue_:
                break
        if not matched:
            out.append(Skip(alert.fingerprint, alert.alertname, "no route matches"))
    return out
