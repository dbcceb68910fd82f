"""The one notification hook every runbook uses: it tells the run's notify_block how the run ended."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import tasks.notify as notify


def test_the_hook_names_the_flow_the_run_and_the_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, str, str]] = []
    monkeypatch.setattr(notify.send_notification, "fn", lambda ref, subject, body: sent.append((ref, subject, body)))
    hook = notify.notify_hook("FAILED")
    assert hook.__name__ == "notify_failed"  # what Prefect's log shows for the hook
    state = SimpleNamespace(type=SimpleNamespace(value="FAILED"), message="pg_restore exited 1")
    run = SimpleNamespace(name="brave-otter", id="1234", parameters={"notify_block": "slack-webhook/ops"})
    hook(SimpleNamespace(name="disaster-recovery"), run, state)
    assert sent == [("slack-webhook/ops", "disaster-recovery FAILED: brave-otter",
                     "Flow run brave-otter (1234) ended FAILED: pg_restore exited 1")]
    hook(SimpleNamespace(name="backup"), SimpleNamespace(name="x", id="y", parameters={}), state)
    assert len(sent) == 1  # no notify_block: nothing sent
