"""Notifications through a Prefect notification block (Slack, e-mail, custom webhook, ...)."""

from __future__ import annotations

from collections.abc import Callable

from prefect import task
from prefect.blocks.core import Block
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import Flow, FlowRun
from prefect.states import State

from tasks.log import run_logger


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def send_notification(block_ref: str, subject: str, body: str) -> None:
    """Send through the block saved as ``<block-type-slug>/<name>`` (e.g. ``slack-webhook/ops``)."""
    block = Block.load(block_ref)
    notify = getattr(block, "notify", None)
    if notify is None:
        raise TypeError(f"block {block_ref} is not a notification block")
    notify(body=body, subject=subject)
    run_logger().info("notified %s: %s", block_ref, subject)


def notify_hook(outcome: str) -> Callable[[Flow, FlowRun, State], None]:
    """A flow state hook (``on_failure=[notify_hook("FAILED")]``, ...) that tells the run's ``notify_block``
    parameter, when it has one, how the run ended. Named ``notify_<outcome>`` in Prefect's log."""

    def hook(flow: Flow, flow_run: FlowRun, state: State) -> None:
        block_ref = (flow_run.parameters or {}).get("notify_block")
        if block_ref:
            send_notification.fn(block_ref, subject=f"{flow.name} {outcome}: {flow_run.name}",
                                 body=f"Flow run {flow_run.name} ({flow_run.id}) ended {state.type.value}: "
                                      f"{state.message or ''}")

    hook.__name__ = hook.__qualname__ = f"notify_{outcome.lower()}"
    return hook
