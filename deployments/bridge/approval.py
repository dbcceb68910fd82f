"""Approval for alert-started destructive runbooks: the run is created Paused with an input form.

The form's schema is saved with Prefect's own (private) ``create_v2_schema``, the call ``pause_flow_run(
wait_for_input=...)`` makes, so the Prefect UI shows the same form it shows for a flow that pauses itself.
"""

from __future__ import annotations

import json
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, Field

from deployments.routes import Trigger, printable

APPROVAL_PAUSE_KEY = "approval"


class Approval(BaseModel):
    """The form an operator fills in to let an alert-started destructive runbook go ahead."""

    approved_by: str = Field(min_length=1, description="Who approves this run (name or handle).")
    confirm: Literal[True] = Field(description="Tick to start the runbook with the parameters shown.")
    note: str = Field(default="", description="Why (ticket, incident).")


def approval_state(trigger: Trigger) -> tuple[Any, dict[str, str]]:
    """The Paused state a run that waits for approval is created in, and the keys its form is saved under."""
    from prefect.input.run_input import keyset_from_paused_state
    from prefect.states import Paused

    route, alert = trigger.route, trigger.alert
    state = Paused(timeout_seconds=int(route.approval_timeout), reschedule=True,
                   pause_key=APPROVAL_PAUSE_KEY, name="Paused")
    keyset = keyset_from_paused_state(state)
    state.state_details.run_input_keyset = keyset
    state.message = f"waiting for approval: alert {printable(alert.alertname)} via route {route.name}"
    return state, keyset


async def has_input(client: Any, run_id: UUID, key: str) -> bool:
    """Whether the run already holds the flow-run input ``key``."""
    import httpx

    try:
        await client.read_flow_run_input(run_id, key)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:
            return False
        raise
    return True


def approval_description(trigger: Trigger) -> str:
    """The markdown shown above the form: the alert, the route and the parameters the run starts with."""
    alert = trigger.alert
    summary = alert.annotations.get("summary") or alert.annotations.get("description") or ""

    def shown(text: str, limit: int = 200) -> str:  # sender's text in the form: one line, no code spans
        return printable(text, limit).replace("`", "'")

    return "\n".join([
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


async def attach_approval_form(client: Any, run_id: UUID, keyset: dict[str, str], trigger: Trigger) -> None:
    """Save the form's schema and description as the paused run's inputs (an input saved before is kept)."""
    import httpx
    from prefect._internal.pydantic.v2_schema import create_v2_schema

    schema = create_v2_schema(Approval.__name__, model_base=Approval)
    description = approval_description(trigger)
    for key, value in ((keyset["schema"], schema), (keyset["description"], description)):
        try:
            await client.create_flow_run_input(run_id, key, json.dumps(value))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 409:  # 409: saved by an earlier attempt
                raise
