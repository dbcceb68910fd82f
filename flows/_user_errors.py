"""A runbook's own errors are logged without a traceback; bugs keep theirs.

A :class:`blocks.errors.RunbookError` (an unknown backup id, a refused configuration, a failed check) is
raised on purpose with a message that says what is wrong and what was left untouched: Prefect's engine
logs it with the full Python traceback (``Encountered exception during execution`` for a flow, ``Task run
failed with exception`` for a task), which buries the message. This filter on Prefect's flow-run and
task-run loggers keeps the message line and moves the traceback to a DEBUG record. Any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging

from blocks.errors import RunbookError

ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class RunbookErrorsWithoutTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno > logging.DEBUG and isinstance(exc, RunbookError):
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("traceback of %s", type(exc).__name__, exc_info=record.exc_info,
                             extra={k: v for k, v in vars(record).items() if k in ("flow_run_id", "task_run_id",
                                                                                    "flow_run_name", "flow_name",
                                                                                    "task_run_name", "task_name")})
            record.exc_info = None
            record.exc_text = None
        return True


def install() -> None:
    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RunbookErrorsWithoutTraceback) for f in logger.filters):
            logger.addFilter(RunbookErrorsWithoutTraceback())


install()
