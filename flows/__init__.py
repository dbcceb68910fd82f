"""The runbooks. Importing any of them first makes flow-run heartbeats stop at once when a flow ends."""

from flows import _heartbeats  # noqa: F401 - installs the heartbeat fix (see the module)
