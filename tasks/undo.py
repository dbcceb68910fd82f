"""The undo stack of a runbook that changes production (DESIGN.md, "Changing production").

Each step that changes something registers its undo *before* it runs; the step's undo must therefore
cope with the step having done nothing or only part of its work. On an error inside the ``with`` block
the undos run in reverse order, each logged, each attempted even when an earlier one failed, and the
error is re-raised. Afterwards :attr:`UndoStack.outcomes` says what was undone and what could not be, so
the flow can decide whether the system is whole (fully as before) and write its report.

    with UndoStack() as undo:
        undo.register("rename databases back", lambda: rename_back(...))
        rename_databases(...)
        undo.register("reload Redis from its safety copy", lambda: reload_redis(...))
        restore_redis(...)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from tasks.log import run_logger


@dataclass(frozen=True)
class UndoOutcome:
    """What happened to one registered undo."""

    step: str
    ok: bool
    error: str = ""


class UndoStack:
    """Undos registered before each change; run in reverse when the block fails."""

    def __init__(self) -> None:
        self._undos: list[tuple[str, Callable[[], Any]]] = []
        self.outcomes: list[UndoOutcome] = []
        self.failed: BaseException | None = None

    def register(self, step: str, undo: Callable[[], Any]) -> None:
        """Call before the change ``step`` describes: ``undo`` puts back what that change does."""
        self._undos.append((step, undo))

    @property
    def pending(self) -> list[str]:
        """The steps whose undo would run now, newest first."""
        return [step for step, _ in reversed(self._undos)]

    @property
    def whole(self) -> bool:
        """True when no undo was needed or every undo that ran succeeded."""
        return all(outcome.ok for outcome in self.outcomes)

    def undo_all(self) -> list[UndoOutcome]:
        """Run every registered undo, newest first; an undo that fails is logged and the rest still run."""
        log = run_logger()
        while self._undos:
            step, undo = self._undos.pop()
            log.warning("undo: %s", step)
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - every undo is attempted; the failure is reported
                log.error("undo failed: %s: %s", step, exc)
                self.outcomes.append(UndoOutcome(step=step, ok=False, error=str(exc)))
            else:
                self.outcomes.append(UndoOutcome(step=step, ok=True))
        return self.outcomes

    def __enter__(self) -> UndoStack:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc is None:
            self._undos.clear()  # every change is in: nothing to put back
            return False
        self.failed = exc
        run_logger().error("a change failed (%s); undoing %d step(s)", exc, len(self._undos))
        self.undo_all()
        return False
