"""A user's mistake ends the run Failed with the message and no traceback in the run's log (Prefect's API);
a bug keeps its traceback. Read back from the real run logs of the session's Prefect API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow


def _run_logs(flow_run_id: Any) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


@flow(name="test-bug")
def _buggy() -> None:
    {}["missing"]  # noqa: B018 - a bug: KeyError


def test_an_unknown_backup_id_fails_with_the_message_and_no_traceback(prefect_harness: None,
                                                                        tmp_path: Path) -> None:
    from blocks.store import BackupStore
    from flows.verify import verify_backup

    store = BackupStore(path=str(tmp_path / "store"))
    state = verify_backup(store=store, backup_id="20990101T000000Z-abcdef", return_state=True)
    assert state.is_failed()
    lines = _run_logs(state.state_details.flow_run_id)
    failure = [line for line in lines if "20990101T000000Z-abcdef" in line]
    assert failure, lines
    assert not [line for line in lines if "Traceback" in line], "\n".join(lines)


def test_a_bug_keeps_its_traceback(prefect_harness: None) -> None:
    import flows  # noqa: F401 - the filter is installed whenever the runbooks are imported

    state = _buggy(return_state=True)
    assert state.is_failed()
    lines = _run_logs(state.state_details.flow_run_id)
    assert [line for line in lines if "Traceback" in line and "KeyError" in line], "\n".join(lines)
