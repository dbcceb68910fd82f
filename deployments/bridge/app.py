"""The bridge as an ASGI app: ``POST /alertmanager``, ``/healthz`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route as HttpRoute

from deployments.bridge.auth import authorized
from deployments.bridge.config import BridgeConfig
from deployments.bridge.dispatch import Bridge
from deployments.bridge.logs import log
from deployments.bridge.metrics import BridgeMetrics
from deployments.bridge.runs import ApiUnavailable, PrefectRunStarter, RunStarter
from deployments.routes import Notification, describe_validation_error, printable

ANSWER_TEXT_LIMIT = 1000  # characters of any one string in an answer


def printable_answer(content: Any) -> Any:
    """A JSON answer with every string (keys too) cut and escaped (``printable``)."""
    if isinstance(content, str):
        return printable(content, ANSWER_TEXT_LIMIT)
    if isinstance(content, dict):
        return {printable_answer(k): printable_answer(v) for k, v in content.items()}
    if isinstance(content, list | tuple):
        return [printable_answer(v) for v in content]
    return content


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
    would walk them all, a pause of the event loop that every request in flight waits out. Frozen, they are
    never scanned again; objects allocated later are collected as usual.
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
