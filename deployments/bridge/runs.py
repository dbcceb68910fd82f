"""Creating a flow run from a deployment through the Prefect API, with the alert's idempotency key."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from deployments.bridge.approval import approval_state, attach_approval_form, has_input
from deployments.bridge.logs import log
from deployments.routes import Trigger, printable


@dataclass(frozen=True)
class RunOutcome:
    created: bool  # False: the idempotency key returned an existing run
    flow_run_id: str
    flow_run_name: str


class DeploymentMissing(Exception):
    """The routed deployment does not exist on the Prefect server."""


class ApiUnavailable(Exception):
    """The Prefect API could not be reached or answered 5xx: Alertmanager should retry."""


class ParametersRejected(Exception):
    """The Prefect API refused the rendered parameters (they do not fit the flow's schema)."""


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
        from prefect.states import Scheduled, to_state_create

        client = await self._get_client()
        route, alert = trigger.route, trigger.alert
        state, keyset = approval_state(trigger) if route.require_approval else (Scheduled(), None)
        body = DeploymentFlowRunCreate(
            parameters=trigger.parameters,
            state=to_state_create(state),
            tags=["alert", f"route:{route.name}", f"alertname:{printable(alert.alertname, 80)}"[:100]],
            idempotency_key=trigger.idempotency_key,
        ).model_dump(mode="json", exclude_unset=True)

        response = await self._post_run(client, route.deployment, body)
        run = response.json()
        created = response.status_code == 201
        if keyset is not None and (created or not await has_input(client, UUID(run["id"]), keyset["schema"])):
            # also on a repeat: the call that created the run may have died before the form was saved
            await attach_approval_form(client, UUID(run["id"]), keyset, trigger)
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


def _api_detail(response: Any) -> str:
    try:
        detail = response.json().get("detail", "")
    except (ValueError, AttributeError):
        detail = ""
    return str(detail)[:500] or f"HTTP {response.status_code}"

