"""A runbook that pauses for approval inside its flow has no deployment concurrency limit.

Prefect 3.8 releases a deployment's concurrency slot when its run pauses, while the paused flow keeps
renewing the slot's lease; the renewal then fails ("Lease not found") and Prefect crashes the run a few
minutes into the approval wait. Which runbooks pause is read from their flow modules' imports, so a new
approval cannot slip in with a limit."""

from __future__ import annotations

import ast
from pathlib import Path

from deployments.registry import RUNBOOKS


def _calls_ask_approval(path: Path) -> bool:
    """The module imports ask_approval, or one of the flows' own helper modules (flows/_*.py) it imports does."""
    tree = ast.parse(path.read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    if any(node.module == "tasks.approval" and any(alias.name == "ask_approval" for alias in node.names)
           for node in imports):
        return True
    helpers = {node.module for node in imports if node.module and node.module.startswith("flows._")}
    return any(_calls_ask_approval(path.parent / f"{module.split('.', 1)[1]}.py") for module in helpers)


def test_the_runbooks_that_pause_for_approval_are_marked_and_hold_no_deployment_slot() -> None:
    pausing = {rb.name for rb in RUNBOOKS if _calls_ask_approval(rb.module_path)}
    assert {"disaster-recovery/disaster-recovery", "rollback/rollback"} <= pausing
    assert pausing == {rb.name for rb in RUNBOOKS if rb.asks_approval}
    for rb in RUNBOOKS:
        if rb.asks_approval:
            assert rb.concurrency_limit is None, rb.name
