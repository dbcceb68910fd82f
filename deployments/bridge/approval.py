"""Approval for alert-started destructive runbooks: the run is created Paused with an input form.

The form is the runbooks' own approval form (tasks/approval.py): a decision with no default, and to approve,
the deployment's name (``flow/deployment``) typed. Its schema is saved with Prefect's own (private)
``create_v2_schema``, the call ``pause_flow_run(wait_for_input=...)`` makes, so the Prefect UI shows the same
form it shows for a flow that pauses itself, and the server refuses an answer that does not fit it. A
rejection resumes the run like an approval; the flow then ends Cancelled before doing anything
(``tasks.approval.refused_at_start``).
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from deployments.routes import Trigger, printable

APPROVAL_PAUSE_KEY = "approval"  # tasks.approval.BRIDGE_PAUSE_KEY (checked by tests/test_webhook.py)


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
        f"Resume with the form: choose **approve** and type `{trigger.route.deployment}` to start it, or "
        "**reject** (or cancel this run) to refuse; a rejected run ends Cancelled without changing anything.",
    ])


async def attach_approval_form(client: Any, run_id: UUID, keyset: dict[str, str], trigger: Trigger) -> None:
    """Save the form's schema and description as the paused run's inputs (an input saved before is kept)."""
    import httpx
    from prefect._internal.pydantic.v2_schema import create_v2_schema

    from tasks.approval import approval_form

    description = approval_description(trigger)
    form = approval_form(trigger.route.deployment, description)
    schema = create_v2_schema(form.__name__, model_base=form)
    for key, value in ((keyset["schema"], schema), (keyset["description"], description)):
        try:
            await client.create_flow_run_input(run_id, key, json.dumps(value))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 409:  # 409: saved by an earlier attempt
                raise
