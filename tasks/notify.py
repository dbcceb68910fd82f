"""Notifications through a Prefect notification block (Slack, e-mail, custom webhook, ...)."""

from __future__ import annotations

from prefect import task
from prefect.blocks.core import Block
from prefect.cache_policies import NO_CACHE

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
