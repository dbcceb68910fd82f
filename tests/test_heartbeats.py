"""flows._heartbeats: same heartbeats as Prefect's, but the thread stops as soon as the flow ends."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import prefect.flow_engine as engine_module
import pytest

import flows  # noqa: F401 - installs the replacement
from flows import _heartbeats


class FakeEngine:
    def __init__(self, seconds: float | None) -> None:
        self.heartbeat_seconds = seconds
        self.flow_run = SimpleNamespace(state=SimpleNamespace(is_final=lambda: self.final))
        self.final = False
        self.logger = SimpleNamespace(debug=lambda *a, **k: None)
        self.emitted: list[tuple[object, object]] = []

    def _build_heartbeat_event_template(self) -> tuple[str, list[str]]:
        return "resource", ["related"]

    def _emit_flow_run_heartbeat(self, resource: object, related: object) -> None:
        self.emitted.append((resource, related))


def wait_for(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "flow-run-heartbeats"]


def test_installed_for_the_pinned_prefect():
    assert _heartbeats.INSTALLED
    assert engine_module._send_heartbeats is _heartbeats.send_heartbeats


def test_thread_stops_when_the_flow_ends_without_sleeping_out_its_step(monkeypatch):
    # Prefect's own loop sleeps in 1 s steps with time.sleep; make any such sleep hang, so only a loop
    # that waits on the stop event can end within the join.
    never = threading.Event()
    monkeypatch.setattr(engine_module.time, "sleep", lambda _s: never.wait(30))
    engine = FakeEngine(180)
    with _heartbeats.send_heartbeats(engine):
        wait_for(lambda: len(engine.emitted) == 1)
        assert heartbeat_threads()
    assert not heartbeat_threads()
    assert engine.emitted == [("resource", ["related"])]


def test_heartbeats_repeat_at_the_interval_and_stop_at_a_final_state(monkeypatch):
    monkeypatch.setattr(engine_module, "MINIMUM_HEARTBEAT_INTERVAL", 0.02)
    engine = FakeEngine(0.02)
    with _heartbeats.send_heartbeats(engine):
        wait_for(lambda: len(engine.emitted) >= 3)
        engine.final = True
        wait_for(lambda: not heartbeat_threads())
        count = len(engine.emitted)
        time.sleep(0.1)
        assert len(engine.emitted) == count


def test_no_heartbeats_when_disabled():
    engine = FakeEngine(None)
    with _heartbeats.send_heartbeats(engine):
        assert not heartbeat_threads()
    assert engine.emitted == []


def test_a_failing_emit_never_fails_the_flow(monkeypatch):
    engine = FakeEngine(180)

    def boom(*_a):
        engine.emitted.append("tried")
        raise RuntimeError("API down")

    monkeypatch.setattr(engine, "_emit_flow_run_heartbeat", boom)
    with _heartbeats.send_heartbeats(engine):
        wait_for(lambda: engine.emitted == ["tried"])
    assert not heartbeat_threads()


@pytest.mark.parametrize("version", ["3.9.0", "4.0.0"])
def test_not_installed_for_an_unchecked_version(monkeypatch, version):
    monkeypatch.setattr(_heartbeats.prefect, "__version__", version)
    original = engine_module._send_heartbeats
    monkeypatch.setattr(engine_module, "_send_heartbeats", original)
    assert _heartbeats.install() is False
    assert engine_module._send_heartbeats is original
