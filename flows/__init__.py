"""The runbooks. Importing any of them first makes flow-run heartbeats stop at once when a flow ends, and
makes a runbook's own errors show in the run's log without a traceback."""

from flows import _heartbeats, _user_errors  # noqa: F401 - installed on import (see the modules)
