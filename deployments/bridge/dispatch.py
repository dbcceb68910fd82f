"""What the bridge does with one notification: dedup cache, cooldowns, run creation and its background retries."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

from deployments.bridge.config import BridgeConfig
from deployments.bridge.logs import log
from deployments.bridge.metrics import BridgeMetrics
from deployments.bridge.runs import ApiUnavailable, DeploymentMissing, ParametersRejected, RunOutcome, RunStarter
from deployments.routes import Notification, Skip, Trigger, plan

MAX_RETRY_BACKOFF = 30.0


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

