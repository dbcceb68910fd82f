"""A flow that records which process ran it, served the way `runbooks serve` serves (tests/test_forkserver.py).

    python -c "from tests.forkserver_probe import main; main('forkserver')"   # or 'spawn'
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Annotated

from prefect import flow
from pydantic import Field

# Which process imported this module: under the forkserver, the forkserver, before any run (a run is a fork
# of it and finds the module loaded); under spawn, the run's own process, if it imports the module at all.
IMPORTED_BY = os.getpid()
THREADS_AT_IMPORT = threading.active_count()


@flow(name="forkserver-probe")
def probe(out: str, label: Annotated[str, Field(min_length=1)] = "probe") -> None:
    """Write this run's pid, its parent's, and which process imported this module into ``out``.

    ``label``'s annotation, a string under ``from __future__ import annotations`` as in the runbooks, resolves
    only in this module's globals: the run fails its parameter validation if the flow arrives without them.
    """
    # Read through sys.modules: the runner may pickle this function with its globals by value.
    module = sys.modules.get("tests.forkserver_probe")
    seen = {"label": label, "pid": os.getpid(), "ppid": os.getppid(),
            "imported_by": getattr(module, "IMPORTED_BY", None),
            "threads_at_import": getattr(module, "THREADS_AT_IMPORT", None)}
    with open(out, "w") as handle:
        json.dump(seen, handle)


def main(method: str) -> None:
    from prefect.deployments.runner import EntrypointType

    from deployments.serve import serve_flows

    serve_flows([(probe, {"name": method, "entrypoint_type": EntrypointType.MODULE_PATH})], poll=1, limit=None,
                start_method=method)
