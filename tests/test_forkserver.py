"""deployments.forkserver: served flow runs fork from a process that imported Prefect and the flows once.

The runs go through Prefect's real runner (``serve``) against the session's Prefect API; the probe flow
records which process ran it and which process had imported its module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tasks.process import stop_process

ROOT = Path(__file__).resolve().parent.parent


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@contextmanager
def served_probe(method: str, work: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """Serve the probe with ``method``, run it once through the API; yields the server process and what the
    run recorded, and stops the server however the block ends."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    out, log_path = work / "probe.json", work / "probe.log"
    log = open(log_path, "wb")  # noqa: SIM115
    # -c, not -m: a main module that is a file would be run again in every child as __mp_main__.
    proc = subprocess.Popen([sys.executable, "-c", f"from tests.forkserver_probe import main; main({method!r})"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    deployment = client.read_deployment_by_name(f"forkserver-probe/{method}")
                    break
                except Exception:  # noqa: BLE001 - not registered yet
                    assert time.monotonic() < deadline, "the probe was not served within 90 s"
                    time.sleep(0.5)
            run = client.create_flow_run_from_deployment(deployment.id, parameters={"out": str(out)})
            deadline = time.monotonic() + 120
            while not (state := client.read_flow_run(run.id).state).is_final():
                assert time.monotonic() < deadline, f"the probe run is still {state.type.value} after 120 s"
                time.sleep(0.3)
        assert state.is_completed(), log_path.read_text()[-3000:]
        yield proc, json.loads(out.read_text())
    finally:
        stop_process(proc, timeout=30, group=True)


@pytest.mark.usefixtures("prefect_harness")
def test_a_served_run_is_a_fork_of_the_single_threaded_forkserver(tmp_path: Path) -> None:
    with served_probe("forkserver", tmp_path) as (proc, seen):
        server = seen["ppid"]
        assert seen["label"] == "probe"  # the Annotated parameter validated
        assert seen["imported_by"] == server != seen["pid"]  # the module was loaded before the run began
        assert _parent(server) == proc.pid and "multiprocessing.forkserver" in _cmdline(server)
        assert seen["threads_at_import"] == 1 and _threads(server) == 1  # nothing to deadlock a fork


@pytest.mark.usefixtures("prefect_harness")
def test_spawn_start_method_leaves_prefects_own_start(tmp_path: Path) -> None:
    with served_probe("spawn", tmp_path) as (proc, seen):
        assert seen["label"] == "probe"
        assert seen["ppid"] == proc.pid and seen["imported_by"] in (None, seen["pid"])


def test_nothing_is_installed_for_another_prefect(monkeypatch: pytest.MonkeyPatch) -> None:
    import copyreg

    import prefect
    import prefect.flow_engine as engine
    from prefect import Flow

    from deployments import forkserver

    monkeypatch.setattr(prefect, "__version__", "3.9.0")
    assert forkserver.install(["tests.forkserver_probe"]) is False
    assert engine.multiprocessing is __import__("multiprocessing") and not forkserver.installed()
    # and `runbooks serve` then registers deployments, as prefect.serve() does (flows stay pickled by value)
    assert forkserver.pickle_flows_by_reference() is False and Flow not in copyreg.dispatch_table
