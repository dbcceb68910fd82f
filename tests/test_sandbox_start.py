"""`runbooks sandbox` / `runbooks up` starting their children: a start that hangs says where (SIGUSR1 dumps every
thread's stack into the sandbox's log, which tests/test_browser_ui.py's fixture shows on its timeout), and a
child started while another thread imports still starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_browser_ui import Sandbox

PROJECT = Path(__file__).resolve().parent.parent

# A sandbox whose start hangs: deployments.sandbox_stack.main as shipped, with run_sandbox waiting in a thread
# named for the test.
_HANGING_SANDBOX = """
import threading, time
import deployments.sandbox_stack as sandbox

def run_sandbox(args):
    waiting = threading.Thread(target=time.sleep, args=(60,), name="waits-forever", daemon=True)
    waiting.start()
    print("services up", flush=True)
    waiting.join()
    return 0

sandbox.run_sandbox = run_sandbox
sandbox.main(["sandbox"])
"""


def test_a_hanging_sandbox_shows_every_threads_stack_in_the_fixtures_message(tmp_path: Path) -> None:
    log = tmp_path / "sandbox.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _HANGING_SANDBOX], cwd=PROJECT, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "services up" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        text = Sandbox({}, proc, log).stacks_and_log_tail()
        assert proc.poll() is None  # the dump does not stop it
    finally:
        proc.kill()
        proc.wait()
    assert "services up" in text
    assert len(re.findall(r"^(?:Current thread|Thread) 0x", text, re.MULTILINE)) == 2, text  # main and the waiter
    assert "in run_sandbox" in text and "in main" in text, text  # where each waits


# Another thread is inside `import ctypes` (as the sandbox's service thread is while it imports psycopg) when
# the main thread starts a child: the child must not need that import's lock between fork and exec.
_IMPORT_DURING_START = """
import importlib.abc, os, sys, threading, time
from pathlib import Path
from deployments.serve import ChildProcesses

sys.modules.pop("ctypes", None)
inside = threading.Event()

class SlowImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ctypes" and threading.current_thread().name == "importer":
            inside.set()
            time.sleep(3)  # holding the module lock of ctypes
        return None

sys.meta_path.insert(0, SlowImport())
threading.Thread(target=lambda: __import__("ctypes"), name="importer", daemon=True).start()
inside.wait()
child = ChildProcesses(Path(sys.argv[1])).start("true", ["/bin/true"], dict(os.environ))
print("child exited", child.wait(), flush=True)
"""


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_child_started_while_another_thread_imports_still_starts(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _IMPORT_DURING_START, str(tmp_path)], cwd=PROJECT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        stuck = _children(proc.pid)  # the child stuck before its exec is in a session of its own
        proc.kill()
        proc.communicate()
        for pid in stuck:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError("starting a child hung: its preexec_fn waits for a lock held by a thread that does "
                             "not exist in the child") from None
    assert proc.returncode == 0 and b"child exited 0" in out, out
