"""The bridge's logger: every argument of its log lines is cut and escaped."""

from __future__ import annotations

import logging

from deployments.routes import printable

LOG_ARG_LIMIT = 300  # characters of any one argument of a log line


class _PrintableArgs(logging.Filter):
    """Every argument of the bridge's log lines is cut and escaped: alert names, fingerprints, reasons and
    error texts come from the sender, and a newline in one would forge a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(a if isinstance(a, int | float) else printable(a, LOG_ARG_LIMIT)
                                for a in record.args)
        return True



log = logging.getLogger("runbooks.webhook")
log.addFilter(_PrintableArgs())
