"""The Alertmanager bridge: an authenticated ASGI receiver that turns alerts into Prefect flow runs.

``POST /alertmanager`` takes Alertmanager's webhook payload (version 4). It requires a bearer token or
basic auth (what Alertmanager's ``http_config`` sends), compared in constant time (401 otherwise); a body
over the limit is 413, a malformed one 400 with the reason; bad input is never a 500. Alerts are routed
by the routes file (deployments/routes.py), and each (route, fingerprint, status, startsAt) starts at most
one flow run, ever: the run is created with a flow-run idempotency key derived from them, so repeats from
``repeat_interval``, retries, HA peers and bridge restarts all come back as the run the first created.
Runs of routes that require approval are created Paused with an input form: nothing happens until an
operator resumes them in the Prefect UI (the run is then scheduled and the runner picks it up), and
cancelling the paused run refuses it. ``/healthz`` and ``/metrics`` (Prometheus text format) need no auth.

`runbooks webhook --routes FILE [--host H] [--port P] [--tls-cert F --tls-key F [--tls-client-ca F]]`; the
token comes from $RUNBOOKS_WEBHOOK_TOKEN or --token-file (exactly one of them), basic-auth users from
--basic-auth-file (``user:password`` lines): never from argv. Anything taken from a request that reaches a log
line or an answer is cut and escaped (``routes.printable``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import json
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from uuid import UUID

from pydantic import BaseModel, Field, SecretStr, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route as HttpRoute

from deployments.routes import (
    CompiledRoute,
    Notification,
    Skip,
    Trigger,
    describe_validation_error,
    load_routes,
    plan,
    printable,
    registry_destructive,
)

ANSWER_TEXT_LIMIT = 1000  # characters of any one string in an answer
LOG_ARG_LIMIT = 300  # characters of any one argument of a log line


class _PrintableArgs(logging.Filter):
    """Every argument of the bridge's log lines is cut and escaped: alert names, fingerprints, reasons and
    error texts come from the sender, and a newline in one would forge a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(a if isinstance(a, int | float) else printable(a, LOG_ARG_LIMIT)
                                for a in record.args)
        return True


def printable_answer(content: Any) -> Any:
    """A JSON answer with every string (keys too) cut and escaped (``printable``)."""
    if isinstance(content, str):
        return printable(content, ANSWER_TEXT_LIMIT)
    if isinstance(content, dict):
        return {printable_answer(k): printable_answer(v) for k, v in content.items()}
    if isinstance(content, list | tuple):
        return [printable_answer(v) for v in content]
    return content


log = logging.getLogger("runbooks.webhook")
log.addFilter(_PrintableArgs())

DEFAULT_PORT = 9095
DEFAULT_MAX_BODY = 1024 * 1024
MIN_SECRET_LENGTH = 16  # refuses placeholders like the REPLACE-ME of deployments/k8s/bridge.yaml
TOKEN_ENV = "RUNBOOKS_WEBHOOK_TOKEN"
TOKEN_FILE_ENV = "RUNBOOKS_WEBHOOK_TOKEN_FILE"
BASIC_AUTH_FILE_ENV = "RUNBOOKS_WEBHOOK_BASIC_AUTH_FILE"
ROUTES_ENV = "RUNBOOKS_ROUTES"
APPROVAL_PAUSE_KEY = "approval"
MAX_RETRY_BACKOFF = 30.0
CREATION_FAILURES = ("retries_exhausted", "error", "shutdown")  # reasons of runbooks_bridge_creations_failed


class Approval(BaseModel):
    """The form an operator fills in to let an alert-started destructive runbook go ahead."""

    approved_by: str = Field(min_length=1, description="Who approves this run (name or handle).")
    confirm: Literal[True] = Field(description="Tick to start the runbook with the parameters shown.")
    note: str = Field(default="", description="Why (ticket, incident).")


# -- configuration -----------------------------------------------------------------------------------------


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


# -- authentication ----------------------------------------------------------------------------------------


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


# -- metrics -----------------------------------------------------------------------------------------------


class BridgeMetrics:
    """Counters and a latency histogram in their own registry (one per app, so tests do not collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        ns = "runbooks_bridge"
        self.notifications = Counter(f"{ns}_notifications_received", "Accepted webhook notifications.",
                                     registry=self.registry)
        self.alerts = Counter(f"{ns}_alerts_received", "Alerts in accepted notifications.", ["status"],
                              registry=self.registry)
        self.deduplicated = Counter(f"{ns}_alerts_deduplicated", "Alert notifications that were repeats of one "
                                    "that already started a run.", registry=self.registry)
        self.runs = Counter(f"{ns}_runs_created", "Flow runs created.", ["deployment", "route", "approval"],
                            registry=self.registry)
        self.skipped = Counter(f"{ns}_alerts_skipped", "Alerts that started nothing, by reason.", ["reason"],
                               registry=self.registry)
        self.rejected = Counter(f"{ns}_requests_rejected", "Requests refused, by reason.", ["reason"],
                                registry=self.registry)
        self.in_flight = Gauge(f"{ns}_creations_in_flight", "Run creations not finished yet (answered as pending "
                               "or waiting for a retry).", registry=self.registry)
        self.retries = Counter(f"{ns}_creation_retries", "Background run creations that failed and are retried "
                               "(same idempotency key: a retry never makes a second run).", registry=self.registry)
        self.failed = Counter(f"{ns}_creations_failed", "Alerts answered as pending whose run could not be created "
                              "(the next repeat of the notification tries again), by reason.", ["reason"],
                              registry=self.registry)
        self.latency = Histogram(
            f"{ns}_request_duration_seconds", "Time to answer POST /alertmanager.", ["code"],
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=self.registry,
        )
        for reason in ("unauthorized", "too_large", "invalid", "unavailable"):
            self.rejected.labels(reason)
        for reason in CREATION_FAILURES:
            self.failed.labels(reason)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# -- creating runs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOutcome:
    created: bool  # False: the idempotency key returned an existing run
    flow_run_id: str
    flow_run_name: str


class DeploymentMissing(Exception):
    """The routed deployment does not exist on the Prefect server."""


class ApiUnavailable(Exception):
    """The Prefect API could not be reached or answered 5xx: Alertmanager should retry."""


class RunStarter(Protocol):
    async def start(self, trigger: Trigger) -> RunOutcome: ...

    async def warm_up(self, deployments: Sequence[str]) -> None: ...

    async def aclose(self) -> None: ...


class PrefectRunStarter:
    """Creates flow runs from deployments through the Prefect API (one client, deployment ids cached)."""

    def __init__(self, api_url: str | None = None, httpx_settings: dict[str, Any] | None = None) -> None:
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL

        # Captured now: the bridge may serve from another thread, where a test's temporary settings
        # would not apply, and an unset URL would silently start an ephemeral server.
        self.api_url = api_url or PREFECT_API_URL.value()
        if not self.api_url:
            raise ValueError("PREFECT_API_URL is not set: point the bridge at the Prefect server")
        self._auth_string = PREFECT_API_AUTH_STRING.value()
        self._api_key = PREFECT_API_KEY.value()
        self._httpx_settings = httpx_settings  # TLS options, or a test's fault-injecting transport
        self._client: Any = None
        self._client_lock = asyncio.Lock()
        self._deployments: dict[str, UUID] = {}

    async def _get_client(self) -> Any:
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    from prefect.client.orchestration import PrefectClient

                    client = PrefectClient(self.api_url, auth_string=self._auth_string, api_key=self._api_key,
                                           httpx_settings=self._httpx_settings)
                    await client.__aenter__()
                    self._client = client
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.__aexit__(None, None, None)
            self._client = None

    async def warm_up(self, deployments: Sequence[str]) -> None:
        """Open the client and look up the routed deployments at startup, so the first alert does not pay for
        it (building the client's TLS context alone blocks the event loop for tens of ms). Never fatal."""
        import httpx

        for name in deployments:
            try:
                await self._deployment_id(name)
            except DeploymentMissing:
                log.warning("route deployment %s is not on the Prefect server (yet)", name)
            except httpx.HTTPError as exc:
                log.warning("Prefect API at %s not reachable at startup (%s); the first alert connects",
                            self.api_url, type(exc).__name__)
                return

    async def _deployment_id(self, name: str, *, refresh: bool = False) -> UUID:
        from prefect.exceptions import ObjectNotFound

        if refresh or name not in self._deployments:
            client = await self._get_client()
            try:
                deployment = await client.read_deployment_by_name(name)
            except ObjectNotFound as exc:
                raise DeploymentMissing(name) from exc
            self._deployments[name] = deployment.id
        return self._deployments[name]

    async def start(self, trigger: Trigger) -> RunOutcome:
        import httpx

        try:
            return await self._start(trigger)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise ApiUnavailable(f"Prefect API at {self.api_url}: {type(exc).__name__}") from exc
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code >= 500 or exc.response.status_code == 429:
                raise ApiUnavailable(f"Prefect API answered {exc.response.status_code}") from exc
            raise

    async def _start(self, trigger: Trigger) -> RunOutcome:
        from prefect.client.schemas.actions import DeploymentFlowRunCreate
        from prefect.input.run_input import keyset_from_paused_state
        from prefect.states import Paused, Scheduled, to_state_create

        client = await self._get_client()
        route, alert = trigger.route, trigger.alert
        if route.require_approval:
            state = Paused(timeout_seconds=int(route.approval_timeout), reschedule=True,
                           pause_key=APPROVAL_PAUSE_KEY, name="Paused")
            keyset = keyset_from_paused_state(state)
            state.state_details.run_input_keyset = keyset
            state.message = f"waiting for approval: alert {printable(alert.alertname)} via route {route.name}"
        else:
            state, keyset = Scheduled(), None
        body = DeploymentFlowRunCreate(
            parameters=trigger.parameters,
            state=to_state_create(state),
            tags=["alert", f"route:{route.name}", f"alertname:{printable(alert.alertname, 80)}"[:100]],
            idempotency_key=trigger.idempotency_key,
        ).model_dump(mode="json", exclude_unset=True)

        response = await self._post_run(client, route.deployment, body)
        run = response.json()
        created = response.status_code == 201
        if keyset is not None and (created or not await self._has_input(client, UUID(run["id"]), keyset["schema"])):
            # also on a repeat: the call that created the run may have died before the form was saved
            await self._attach_approval_form(client, UUID(run["id"]), keyset, trigger)
        return RunOutcome(created=created, flow_run_id=run["id"], flow_run_name=run.get("name", ""))

    async def _post_run(self, client: Any, deployment: str, body: dict[str, Any]) -> Any:
        """POST create_flow_run: 201 a new run, 200 the run an earlier call made with the same key."""
        import httpx

        for attempt in (1, 2):
            deployment_id = await self._deployment_id(deployment, refresh=attempt == 2)
            try:
                return await client.request("POST", "/deployments/{id}/create_flow_run",
                                            path_params={"id": deployment_id}, json=body)
            except httpx.HTTPStatusError as exc:
                code = exc.response.status_code
                if code == 404 and attempt == 1:  # deleted and re-created since its id was cached
                    continue
                if code == 404:
                    raise DeploymentMissing(deployment) from exc
                if code in (409, 422):
                    raise ParametersRejected(_api_detail(exc.response)) from exc
                raise
        raise AssertionError("unreachable")

    @staticmethod
    async def _has_input(client: Any, run_id: UUID, key: str) -> bool:
        import httpx

        try:
            await client.read_flow_run_input(run_id, key)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:
                return False
            raise
        return True

    async def _attach_approval_form(self, client: Any, run_id: UUID, keyset: dict[str, str], trigger: Trigger) -> None:
        from prefect._internal.pydantic.v2_schema import create_v2_schema

        schema = create_v2_schema(Approval.__name__, model_base=Approval)
        alert = trigger.alert
        summary = alert.annotations.get("summary") or alert.annotations.get("description") or ""

        def shown(text: str, limit: int = 200) -> str:  # sender's text in the form: one line, no code spans
            return printable(text, limit).replace("`", "'")

        description = "\n".join([
            f"**Approval needed**: alert `{shown(alert.alertname)}` ({alert.status}, fingerprint "
            f"`{shown(alert.fingerprint)}`, "
            f"since {alert.startsAt.isoformat()}) matched route `{trigger.route.name}`, which starts "
            f"`{trigger.route.deployment}`, a runbook that changes things.",
            "",
            f"> {shown(summary, 500)}" if summary else "",
            "",
            "Parameters: `" + json.dumps(trigger.parameters, sort_keys=True)[:2000] + "`",
            "",
            "Resume with the form to start it, or cancel this run to refuse.",
        ])
        import httpx

        for key, value in ((keyset["schema"], schema), (keyset["description"], description)):
            try:
                await client.create_flow_run_input(run_id, key, json.dumps(value))
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 409:  # 409: saved by an earlier attempt
                    raise


class ParametersRejected(Exception):
    """The Prefect API refused the rendered parameters (they do not fit the flow's schema)."""


def _api_detail(response: Any) -> str:
    try:
        detail = response.json().get("detail", "")
    except (ValueError, AttributeError):
        detail = ""
    return str(detail)[:500] or f"HTTP {response.status_code}"


# -- the bridge --------------------------------------------------------------------------------------------


class Bridge:
    """Carries out the plan for one notification: dedup cache, cooldowns, run creation.

    A creation that takes longer than ``respond_within`` (a Prefect API on a busy SQLite can take seconds)
    goes on in the background and the answer lists it under ``pending`` with its idempotency key: the
    response time stays bounded and a repeat still starts nothing. A failure seen within the window is a
    503 (Alertmanager retries). Once an alert has been answered as pending, Alertmanager will not retry it,
    so the bridge does: a transient failure is retried with the same key (a retry never makes a second run)
    for ``retry_for`` seconds; a creation that still fails, or fails for another reason, or is cut short by
    shutdown, is counted and logged. Only a run that exists is remembered as deduplicated, so the next repeat
    of that notification creates it.
    """

    def __init__(self, config: BridgeConfig, starter: RunStarter, metrics: BridgeMetrics) -> None:
        self.config = config
        self.starter = starter
        self.metrics = metrics
        self._seen: OrderedDict[str, str] = OrderedDict()  # idempotency key -> flow run id (the run exists)
        self._cooldown_until: dict[str, tuple[float, str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._in_flight: dict[str, asyncio.Task[RunOutcome | Skip]] = {}
        self._promised: set[str] = set()  # keys in flight already answered 202: the bridge owns their retries
        self._api_slots = asyncio.Semaphore(config.api_concurrency)
        # How long creations take lately (moving average, seconds): the first copy of a notification waits for
        # its run only while that fits in respond_within (see _trigger).
        self._creation_seconds = 0.0
        metrics.in_flight.set_function(lambda: len(self._in_flight))

    def _remember(self, key: str, run_id: str) -> None:
        self._seen[key] = run_id
        self._seen.move_to_end(key)
        while len(self._seen) > self.config.dedup_cache_size:
            self._seen.popitem(last=False)

    async def handle(self, notification: Notification) -> dict[str, list[dict[str, Any]]]:
        self.metrics.notifications.inc()
        for alert in notification.alerts:
            self.metrics.alerts.labels(alert.status).inc()
        out: dict[str, list[dict[str, Any]]] = {"created": [], "pending": [], "skipped": []}
        for step in plan(notification, self.config.routes):
            if isinstance(step, Skip):
                self._skip(out["skipped"], step)
                continue
            outcome = await self._trigger(step)
            if isinstance(outcome, Skip):
                self._skip(out["skipped"], outcome)
            else:
                out["pending" if outcome.get("status") == "creating" else "created"].append(outcome)
        return out

    async def drain(self, timeout: float) -> None:
        """On shutdown: let creations in flight finish; the ones that cannot within ``timeout`` are cancelled
        and reported (counted and logged with their alert), never dropped silently."""
        tasks = list(self._in_flight.values())
        if not tasks:
            return
        _, unfinished = await asyncio.wait(tasks, timeout=timeout)
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.wait(unfinished)

    def _skip(self, out: list[dict[str, Any]], step: Skip) -> None:
        out.append(step.as_dict())
        self._count_skip(step)

    def _count_skip(self, step: Skip) -> None:
        label = _reason_label(step.reason)
        if label == "duplicate":
            self.metrics.deduplicated.inc()
        else:
            self.metrics.skipped.labels(label).inc()

    async def _trigger(self, trigger: Trigger) -> dict[str, Any] | Skip:
        alert, route = trigger.alert, trigger.route
        key = trigger.idempotency_key
        known = self._seen.get(key)
        if known is not None:
            return Skip(alert.fingerprint, alert.alertname, "duplicate: this notification already started a run",
                        route.name, known)
        task = self._in_flight.get(key)
        first = task is None
        if task is None:
            task = asyncio.ensure_future(self._create_until_done(trigger))
            self._in_flight[key] = task
            task.add_done_callback(lambda done: self._finished(key, trigger, done))
        # Only the notification that started the creation waits for it (to name the run in its answer), and only
        # when no other creation is in flight and creations lately finished within the window: in a burst the
        # wait would mostly end in "pending" anyway, after costing every first copy the whole window. A repeat
        # is answered at once, so repeats never queue behind a slow Prefect API.
        calm = len(self._in_flight) == 1 and self._creation_seconds <= self.config.respond_within
        wait = self.config.respond_within if first and calm else 0
        done, _ = await asyncio.wait([task], timeout=wait)
        if not done:
            self._promised.add(key)  # a 202 without the run: from here on, failures are the bridge's to retry
            if not first:
                return Skip(alert.fingerprint, alert.alertname, "duplicate: the run for this notification is being "
                            "created", route.name)
            return {"route": route.name, "deployment": route.deployment, "fingerprint": alert.fingerprint,
                    "alertname": alert.alertname, "status": "creating", "idempotency_key": key,
                    "awaiting_approval": route.require_approval}
        if not first:  # a repeat that arrived while the first was being created
            if task.cancelled() or task.exception() is not None:
                return await self._trigger(trigger) if key not in self._in_flight else Skip(
                    alert.fingerprint, alert.alertname, "duplicate: the run for this notification is being created",
                    route.name)
            result = task.result()
            if isinstance(result, Skip):  # cooldown, missing deployment...: the same answer as the first got
                return result
            return Skip(alert.fingerprint, alert.alertname, "duplicate: this notification already started a run",
                        route.name, result.flow_run_id)
        result = task.result()  # ApiUnavailable within the window: a 503, Alertmanager retries
        if isinstance(result, Skip):
            return result
        return {"route": route.name, "deployment": route.deployment, "fingerprint": alert.fingerprint,
                "alertname": alert.alertname, "status": alert.status, "flow_run_id": result.flow_run_id,
                "flow_run_name": result.flow_run_name, "awaiting_approval": route.require_approval}

    async def _create_until_done(self, trigger: Trigger) -> RunOutcome | Skip:
        """``_create``, retried with backoff on ApiUnavailable once the alert was answered as pending."""
        key = trigger.idempotency_key
        give_up_at = time.monotonic() + self.config.retry_for
        backoff = self.config.retry_backoff
        while True:
            try:
                return await self._create(trigger)
            except ApiUnavailable as exc:
                if key not in self._promised or time.monotonic() + backoff > give_up_at:
                    raise  # answered 503 by the request still waiting for it, or reported by _finished
                self.metrics.retries.inc()
                log.warning("creating the run of route %s for alert %s (%s) failed: %s; retrying in %.1f s with "
                            "the same idempotency key", trigger.route.name, trigger.alert.alertname,
                            trigger.alert.fingerprint, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_RETRY_BACKOFF)

    def _finished(self, key: str, trigger: Trigger, task: asyncio.Task[RunOutcome | Skip]) -> None:
        self._in_flight.pop(key, None)
        promised = key in self._promised
        self._promised.discard(key)
        if task.cancelled():
            reason, exc = "shutdown", None
        else:
            exc = task.exception()  # also marks it retrieved
            if exc is None:
                result = task.result()
                if promised and isinstance(result, Skip):  # the answer said pending: count what it became
                    self._count_skip(result)
                return
            if not promised:
                return  # the request that waited for it answered 503 (counted there); Alertmanager retries
            reason = "retries_exhausted" if isinstance(exc, ApiUnavailable) else "error"
        self.metrics.failed.labels(reason).inc()
        alert, route = trigger.alert, trigger.route
        why = {"shutdown": "the bridge stopped before the Prefect API answered",
               "retries_exhausted": f"still failing after {self.config.retry_for:g} s of retries: {exc}",
               "error": f"{type(exc).__name__}: {exc}"}[reason]
        log.error("no flow run created for alert %s (%s, %s) via route %s -> %s, answered as pending: %s. The "
                  "next repeat of the notification creates it (idempotency key %s)", alert.alertname,
                  alert.fingerprint, alert.status, route.name, route.deployment, why, key,
                  exc_info=exc if reason == "error" else None)

    async def _create(self, trigger: Trigger) -> RunOutcome | Skip:
        """``_create_once``, timed into the moving average that decides whether first copies wait."""
        started = time.monotonic()
        try:
            return await self._create_once(trigger)
        finally:
            self._creation_seconds += 0.3 * (time.monotonic() - started - self._creation_seconds)

    async def _create_once(self, trigger: Trigger) -> RunOutcome | Skip:
        """Cooldown check, then the API call (at most ``api_concurrency`` at once: SQLite serialises writes)."""
        alert, route = trigger.alert, trigger.route
        lock = self._locks.setdefault(trigger.cooldown_key, asyncio.Lock())
        async with lock:
            now = time.monotonic()
            cooling = self._cooldown_until.get(trigger.cooldown_key)
            if route.cooldown > 0 and cooling and cooling[0] > now:
                return Skip(alert.fingerprint, alert.alertname,
                            f"cooldown: route started run {cooling[1]} with these parameters "
                            f"{route.cooldown - (cooling[0] - now):.0f} s ago (cooldown {route.cooldown:.0f} s)",
                            route.name, cooling[1])
            try:
                async with self._api_slots:
                    outcome = await self.starter.start(trigger)
            except DeploymentMissing:
                log.error("route %s: deployment %s not found on the Prefect server", route.name, route.deployment)
                return Skip(alert.fingerprint, alert.alertname,
                            f"deployment {route.deployment} not found on the Prefect server "
                            "(is `runbooks serve` running, or was it deployed?)", route.name)
            except ParametersRejected as exc:
                log.error("route %s: Prefect refused the parameters: %s", route.name, exc)
                return Skip(alert.fingerprint, alert.alertname, f"parameters refused by Prefect: {exc}", route.name)
            self._remember(trigger.idempotency_key, outcome.flow_run_id)
            if not outcome.created:
                return Skip(alert.fingerprint, alert.alertname,
                            "duplicate: this notification already started a run", route.name, outcome.flow_run_id)
            if route.cooldown > 0:
                self._cooldown_until[trigger.cooldown_key] = (time.monotonic() + route.cooldown,
                                                              outcome.flow_run_id)
        self.metrics.runs.labels(route.deployment, route.name, str(route.require_approval).lower()).inc()
        log.info("alert %s (%s, %s) -> %s: flow run %s%s", alert.alertname, alert.fingerprint, alert.status,
                 route.deployment, outcome.flow_run_name, " (awaiting approval)" if route.require_approval else "")
        return outcome


def _reason_label(reason: str) -> str:
    for prefix, label in (("duplicate", "duplicate"), ("cooldown", "cooldown"), ("no route", "no_route"),
                          ("route acts on", "status"), ("parameters", "parameters"), ("deployment", "no_deployment")):
        if reason.startswith(prefix):
            return label
    return "other"


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it passes ``limit`` bytes (whatever Content-Length claimed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                return None
        except ValueError:
            pass
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def freeze_startup_objects() -> int:
    """Exempt what the process allocated up to now from the garbage collector; returns how many objects.

    Prefect's client, pydantic's models and the routes are ~110k long-lived objects, and every full collection
    walks them all: 50 ms measured here, a pause of the event loop that every request in flight waits out.
    Frozen, they are never scanned again; objects allocated later are collected as usual.
    """
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def create_app(config: BridgeConfig, starter: RunStarter | None = None, *, freeze_heap: bool = False) -> Starlette:
    """The bridge as an ASGI app. ``starter`` defaults to the Prefect API in PREFECT_API_URL; ``freeze_heap``
    (the bridge's own process, not a test's): once warmed up, freeze the startup objects."""
    metrics = BridgeMetrics()
    bridge = Bridge(config, starter or PrefectRunStarter(), metrics)

    def reply(started: float, status: int, content: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
        metrics.latency.labels(str(status)).observe(time.perf_counter() - started)
        return JSONResponse(printable_answer(content), status_code=status, headers=headers)

    async def alertmanager(request: Request) -> Response:
        started = time.perf_counter()
        if not authorized(request.headers.get("authorization"), config):
            metrics.rejected.labels("unauthorized").inc()
            log.warning("401 for %s: no valid credentials", request.client.host if request.client else "?")
            return reply(started, 401, {"error": "unauthorized: send the bearer token or basic auth "
                                                 "configured for the bridge"},
                         {"WWW-Authenticate": 'Bearer realm="runbooks", Basic realm="runbooks"'})
        body = await read_body(request, config.max_body_bytes)
        if body is None:
            metrics.rejected.labels("too_large").inc()
            return reply(started, 413, {"error": f"body over {config.max_body_bytes} bytes"})
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            metrics.rejected.labels("invalid").inc()
            reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
            return reply(started, 400, {"error": f"body is not JSON ({reason})"})
        try:
            notification = Notification.model_validate(data)
        except ValidationError as exc:
            metrics.rejected.labels("invalid").inc()
            reason = "not an Alertmanager v4 payload: " + describe_validation_error(exc)
            log.warning("400: %s", reason)
            return reply(started, 400, {"error": reason})
        except RecursionError:
            metrics.rejected.labels("invalid").inc()
            return reply(started, 400, {"error": "payload nested too deeply"})
        try:
            result = await bridge.handle(notification)
        except ApiUnavailable as exc:
            metrics.rejected.labels("unavailable").inc()
            log.error("Prefect API unavailable: %s", exc)
            return reply(started, 503, {"error": f"Prefect API unavailable ({exc}); retry: repeats start no "
                                                 "second run"}, {"Retry-After": "10"})
        return reply(started, 202, result)

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok", "routes": len(config.routes)})

    async def metrics_endpoint(_request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> Any:
        async def warm() -> None:
            await bridge.starter.warm_up(sorted({r.deployment for r in config.routes}))
            if freeze_heap:
                log.info("%d startup objects frozen out of the garbage collector's way", freeze_startup_objects())

        warm_up = asyncio.ensure_future(warm())
        warm_up.add_done_callback(lambda t: t.cancelled() or t.exception() is None or log.warning(
            "warming up the Prefect client failed: %r", t.exception()))
        yield
        warm_up.cancel()
        await asyncio.gather(warm_up, return_exceptions=True)
        await bridge.drain(timeout=10)
        await bridge.starter.aclose()

    app = Starlette(
        routes=[
            HttpRoute("/alertmanager", alertmanager, methods=["POST"]),
            HttpRoute("/healthz", healthz, methods=["GET"]),
            HttpRoute("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.bridge = bridge
    app.state.metrics = metrics
    return app


# -- command line ------------------------------------------------------------------------------------------


def default_routes_file() -> Path:
    return Path(__file__).resolve().parent / "routes.example.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runbooks webhook", description="Alertmanager -> Prefect bridge.")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--routes", default=os.environ.get(ROUTES_ENV),
                        help=f"routes file (default ${ROUTES_ENV}, else {default_routes_file().name})")
    parser.add_argument("--token-file", default=os.environ.get(TOKEN_FILE_ENV),
                        help=f"file holding the bearer token (or ${TOKEN_ENV}, or ${TOKEN_FILE_ENV})")
    parser.add_argument("--basic-auth-file", default=os.environ.get(BASIC_AUTH_FILE_ENV),
                        help="file of user:password lines for basic auth")
    parser.add_argument("--tls-cert", default=os.environ.get("RUNBOOKS_WEBHOOK_TLS_CERT"),
                        help="serve HTTPS with this certificate chain (PEM); needs --tls-key")
    parser.add_argument("--tls-key", default=os.environ.get("RUNBOOKS_WEBHOOK_TLS_KEY"),
                        help="the certificate's private key (PEM, a file only this user can read)")
    parser.add_argument("--tls-client-ca", default=os.environ.get("RUNBOOKS_WEBHOOK_TLS_CLIENT_CA"),
                        help="mutual TLS: accept only clients with a certificate signed by this CA (PEM)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    parser.add_argument("--respond-within", type=float, default=0.03,
                        help="seconds to wait for a run creation before answering it as pending (default 0.03)")
    parser.add_argument("--retry-for", type=float, default=900.0,
                        help="seconds a pending creation that fails is retried before it is reported (default 900)")
    parser.add_argument("--check", action="store_true", help="validate the routes file and exit")
    return parser


def config_from_args(args: argparse.Namespace) -> BridgeConfig:
    routes_path = Path(args.routes) if args.routes else default_routes_file()
    routes = load_routes(routes_path.read_text(), registry_destructive)
    tokens = []
    if os.environ.get(TOKEN_ENV) and args.token_file:
        raise ValueError(f"both ${TOKEN_ENV} and a token file ({args.token_file}) are set: the bridge accepts "
                         "exactly one bearer token; unset one")
    if os.environ.get(TOKEN_ENV):
        tokens.append(SecretStr(os.environ[TOKEN_ENV]))
        log.info("bearer token from $%s", TOKEN_ENV)
    if args.token_file:
        tokens.append(SecretStr(read_secret_file(args.token_file)))
        log.info("bearer token from %s", args.token_file)
    users = parse_basic_auth_file(read_secret_file(args.basic_auth_file)) if args.basic_auth_file else {}
    log.info("routes from %s: %s", routes_path, ", ".join(f"{r.name}->{r.deployment}" for r in routes))
    return BridgeConfig(routes=routes, tokens=tokens, basic_users=users, max_body_bytes=args.max_body_bytes,
                        respond_within=args.respond_within, retry_for=args.retry_for)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv)[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per runner poll otherwise
    try:
        config = config_from_args(args)
    except (OSError, ValueError) as exc:
        print(f"runbooks webhook: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(config.routes)} routes OK")
        return 0
    import uvicorn

    try:
        app = create_app(config, freeze_heap=True)
    except ValueError as exc:
        print(f"runbooks webhook: {exc}", file=sys.stderr)
        return 2
    try:
        tls = tls_options(args.tls_cert, args.tls_key, args.tls_client_ca)
    except ValueError as exc:
        print(f"runbooks webhook: {exc}", file=sys.stderr)
        return 2
    if not tls and args.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("serving plain HTTP on %s: the bearer token crosses the network in clear; give --tls-cert "
                    "and --tls-key (or terminate TLS in front of the bridge)", args.host)
    log.info("Alertmanager bridge on %s://%s:%d/alertmanager%s -> %s", "https" if tls else "http", args.host,
             args.port, " (client certificates required)" if args.tls_client_ca else "",
             app.state.bridge.starter.api_url)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, access_log=False, log_level="warning",
                                  lifespan="on", **tls)).run()
    return 0


def tls_options(cert: str | None, key: str | None, client_ca: str | None) -> dict[str, Any]:
    """uvicorn's TLS settings from --tls-cert/--tls-key/--tls-client-ca, each file checked readable first."""
    import ssl

    if not cert and not key:
        if client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is on top of HTTPS)")
        return {}
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together")
    for path in (cert, key, client_ca):
        if path and not os.access(path, os.R_OK):
            raise ValueError(f"cannot read {path}")
    try:  # a bad pair fails here, with the reason, rather than inside uvicorn's start-up
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        if client_ca:
            context.load_verify_locations(client_ca)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"TLS certificate/key/CA not usable: {exc}") from None
    options: dict[str, Any] = {"ssl_certfile": cert, "ssl_keyfile": key}
    if client_ca:
        options |= {"ssl_ca_certs": client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options
