"""deployments.forkserver: served flow runs fork from a process that imported Prefect and the flows once.

The runs go through Prefect's real runner (``serve``) against the session's Prefect API; the probe flow
records which process ran it and which process had imported its module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _run_probe(method: str, out: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Serve the probe with ``method``, start one run of it through the API, wait for its final state."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    log = open(out.with_suffix(".log"), "wb")  # noqa: SIM115
    # -c, not -m: a main module that is a file would be run again in every child as __mp_main__.
    proc = subprocess.Popen([sys.executable, "-c", f"from tests.forkserver_probe import main; main({method!r})"],
                            cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, out.with_suffix(".log").read_text()[-3000:]
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
    return proc, state.type.value


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.usefixtures("prefect_harness")
def test_a_served_run_is_a_fork_of_the_single_threaded_forkserver(tmp_path: Path) -> None:
    proc, final = _run_probe("forkserver", tmp_path / "probe.json")
    try:
        assert final == "COMPLETED", (tmp_path / "probe.log").read_text()[-3000:]
        seen = json.loads((tmp_path / "probe.json").read_text())
        server = seen["ppid"]
        assert seen["imported_by"] == server != seen["pid"]  # the module was loaded before the run began
        assert _parent(server) == proc.pid and "multiprocessing.forkserver" in _cmdline(server)
        assert seen["threads_at_import"] == 1 and _threads(server) == 1  # nothing to deadlock a fork
    finally:
        _stop(proc)


@pytest.mark.usefixtures("prefect_harness")
def test_spawn_start_method_leaves_prefects_own_start(tmp_path: Path) -> None:
    proc, final = _run_probe("spawn", tmp_path / "probe.json")
    try:
        assert final == "COMPLETED", (tmp_path / "probe.log").read_text()[-3000:]
        seen = json.loads((tmp_path / "probe.json").read_text())
        assert seen["ppid"] == proc.pid and seen["imported_by"] in (None, seen["pid"])
    finally:
        _stop(proc)


def test_install_only_for_the_checked_prefect(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect
    import prefect.flow_engine as engine

    from deployments import forkserver

    monkeypatch.setattr(prefect, "__version__", "3.9.0")
    assert forkserver.install(["tests.forkserver_probe"]) is False
    assert engine.multiprocessing is __import__("multiprocessing") and not forkserver.installed()
