"""Progress of long work, shown as a Prefect progress artifact and in the log, throttled."""

from __future__ import annotations

import threading
import time
from uuid import UUID

from tasks.log import run_logger
from tasks.manifest import human_size


class Progress:
    """Bytes done of an estimated total, across the parts of one run.

    ``artifact_id`` is a progress artifact created by the flow; without one (``task.fn`` in tests)
    only the log shows progress.
    """

    def __init__(self, total_estimate: int, artifact_id: UUID | None = None, every: float = 2.0) -> None:
        self.total = max(total_estimate, 1)
        self.done = 0
        self.artifact_id = artifact_id
        self.every = every
        self._last = 0.0
        self._lock = threading.Lock()

    def percent(self) -> float:
        # The total is an estimate (database size on disk), so hold at 99 % until finish().
        return min(99.0, 100.0 * self.done / self.total)

    def advance(self, count: int) -> None:
        with self._lock:
            self.done += count
            now = time.monotonic()
            if now - self._last < self.every:
                return
            self._last = now
        self._publish(f"{human_size(self.done)} of about {human_size(self.total)}")

    def finish(self) -> None:
        self.done = max(self.done, self.total)
        self._publish("done", final=True)

    def _publish(self, text: str, final: bool = False) -> None:
        pct = 100.0 if final else self.percent()
        if self.artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, pct, description=f"Backup progress: {text}")
        run_logger().debug("progress %.0f%%: %s", pct, text)
