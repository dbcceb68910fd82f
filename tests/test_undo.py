"""The undo stack: reverse order, every undo attempted, outcomes recorded, the error re-raised."""

from __future__ import annotations

import pytest

from tasks.undo import UndoStack


def test_undos_run_newest_first_and_the_error_propagates():
    done: list[str] = []
    with pytest.raises(RuntimeError, match="third step"):
        with UndoStack() as undo:
            undo.register("one", lambda: done.append("undo one"))
            done.append("one")
            undo.register("two", lambda: done.append("undo two"))
            done.append("two")
            raise RuntimeError("third step")
    assert done == ["one", "two", "undo two", "undo one"]
    assert [(o.step, o.ok) for o in undo.outcomes] == [("two", True), ("one", True)]
    assert undo.whole and str(undo.failed) == "third step"


def test_a_failing_undo_is_recorded_and_the_others_still_run():
    done: list[str] = []

    def broken() -> None:
        raise OSError("disk gone")

    with pytest.raises(ValueError):
        with UndoStack() as undo:
            undo.register("one", lambda: done.append("undo one"))
            undo.register("two", broken)
            undo.register("three", lambda: done.append("undo three"))
            raise ValueError("boom")
    assert done == ["undo three", "undo one"]
    assert not undo.whole
    assert [(o.step, o.ok, o.error) for o in undo.outcomes] == [
        ("three", True, ""), ("two", False, "disk gone"), ("one", True, "")]


def test_success_runs_no_undo():
    done: list[str] = []
    with UndoStack() as undo:
        undo.register("one", lambda: done.append("undo one"))
    assert done == [] and undo.outcomes == [] and undo.pending == [] and undo.failed is None
