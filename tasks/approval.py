"""The approval form: what a destructive runbook pauses with, and the form the alert bridge attaches to the
runs it creates Paused. One form, so an operator answers the same questions everywhere.

- **No default decision**: ``decision`` (approve or reject) is required, so Prefect's form cannot be
  submitted without a choice.
- **The target's name, typed**: when the change has a target (a database, a host, a Deployment), approving
  also needs its name typed in ``confirm_target``. The Prefect server checks the answer against the form's
  schema when the form is submitted and refuses another name, or an approval without one; the runbook
  checks it again (:func:`refusal`) and asks again, so nothing is changed until a correct approval or the
  approval timeout (the run then ends Cancelled: nothing was changed).
- A rejection needs no name: the run ends Cancelled, nothing was changed.

The form is a pydantic model; :func:`approval_form` makes the one for a target, with the name in the
schema (a ``pattern``) so the server can check it. Nothing here imports the flows.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from prefect.input import RunInput
from pydantic import ConfigDict, Field

APPROVE = "approve"
REJECT = "reject"
BRIDGE_PAUSE_KEY = "approval"  # the pause key of runs the bridge creates Paused
BRIDGE_RESPONSE_KEY = f"paused-{BRIDGE_PAUSE_KEY}-response"  # where Prefect stores the submitted form


class ApprovalForm(RunInput):
    """What the operator answers in the Prefect UI."""

    decision: Literal["approve", "reject"] = Field(
        title="Decision",
        description="approve: make the change described above. reject: end the run Cancelled; nothing is "
                    "changed. There is no default: one must be chosen.")
    confirm_target: str = Field(
        default="", title="Type the target's name to approve",
        description="Not needed to reject.")
    approved_by: str = Field(default="", title="Your name", description="Who decided (kept in the run's log).")
    note: str = Field(default="", title="Note", description="Why (kept in the run's log and the report).")

    @property
    def approved(self) -> bool:
        return self.decision == APPROVE


def _schema_for(target: str) -> Any:
    """The form's schema, refusing another name than ``target`` and an approval without it."""

    def extra(schema: dict[str, Any]) -> None:
        field = schema["properties"]["confirm_target"]
        field["pattern"] = f"^(?:{re.escape(target)})?$"
        field["title"] = f"Type {target} to approve"
        field["description"] = f"Approving needs the target's name, {target}, typed here. Not needed to reject."
        schema["if"] = {"properties": {"decision": {"const": APPROVE}}, "required": ["decision"]}
        schema["then"] = {"properties": {"confirm_target": {"minLength": 1}}, "required": ["confirm_target"]}

    return extra


def approval_form(target: str | None, description: str) -> type[ApprovalForm]:
    """The form for one pause: with ``target``, approving needs that name typed (checked by the server)."""
    if target is None:
        return ApprovalForm.with_initial_data(description=description)
    form = type("ApprovalForm", (ApprovalForm,), {
        "__module__": __name__, "model_config": ConfigDict(json_schema_extra=_schema_for(target))})
    return form.with_initial_data(description=description)


def refusal(answer: ApprovalForm, target: str | None) -> str | None:
    """Why an approving ``answer`` cannot be taken (a missing or wrong name), or None."""
    if not answer.approved or target is None:
        return None
    typed = answer.confirm_target.strip()
    if not typed:
        return f"the target's name was not typed (type {target} to approve)"
    if typed != target:
        return f"the typed name {typed[:200]!r} is not the target's name {target!r}"
    return None


def ask_approval(description: str, target: str | None, timeout: int) -> ApprovalForm | None:
    """Pause for the form until a decision is taken or ``timeout`` seconds pass (None).

    A wrong or missing name is refused in the run's log and the form is shown again, with why, within the
    same timeout; the answer returned is a rejection or a correct approval."""
    from prefect.flow_runs import pause_flow_run

    from tasks.log import run_logger

    deadline = time.monotonic() + timeout
    preface = ""
    while True:
        remaining = int(deadline - time.monotonic())
        if remaining < 1:
            return None
        form = approval_form(target, preface + description)
        try:
            answer = pause_flow_run(wait_for_input=form, timeout=remaining, poll_interval=2)
        except TimeoutError:
            return None
        why = refusal(answer, target)
        if why is None:
            who = f" by {answer.approved_by}" if answer.approved_by else ""
            run_logger().info("%s%s: %s", "approved" if answer.approved else "rejected", who,
                              answer.note or "(no note)")
            return answer
        run_logger().warning("approval refused: %s; nothing was changed; asking again", why)
        preface = f"**The last answer was refused**: {why}. Nothing was changed.\n\n"


def rejected_before_start() -> ApprovalForm | None:
    """The rejecting answer of a run the bridge created Paused, else None (approved, or not such a run).

    A run the bridge created waits for the form before the flow starts; a rejection resumes it like an
    approval would, so the flow asks here first and ends Cancelled without changing anything."""
    from prefect.context import FlowRunContext
    from prefect.input.actions import read_flow_run_input

    context = FlowRunContext.get()
    if context is None or context.flow_run is None or context.flow_run.deployment_id is None:
        return None
    value = read_flow_run_input(BRIDGE_RESPONSE_KEY, flow_run_id=context.flow_run.id)
    if not value:
        return None
    if not isinstance(value, dict) or value.get("decision") != REJECT:
        return None
    return ApprovalForm.model_construct(**{k: v for k, v in value.items() if k in ApprovalForm.model_fields})


def refused_at_start() -> Any:
    """A Cancelled state when the run's alert approval (the bridge's form) was rejected, else None.

    Every runbook flow returns it before doing anything: ``if (refused := refused_at_start()) is not None``."""
    from prefect.states import Cancelled

    from tasks.log import run_logger

    answer = rejected_before_start()
    if answer is None:
        return None
    why = f"rejected{' by ' + answer.approved_by if answer.approved_by else ''} ({answer.note or 'no reason given'})"
    run_logger().warning("approval %s; nothing was changed", why)
    return Cancelled(message=f"approval {why}; nothing was changed")
