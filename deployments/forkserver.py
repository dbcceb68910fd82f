"""How `runbooks serve` starts a flow run: a fork of a process that has Prefect and the flows imported.

``prefect.serve()`` registers deployments only, so Prefect 3.8.8's runner starts each run as
`python -m prefect.engine`: a new interpreter imports Prefect, reads the deployment and imports the flow
module before the run can propose Running, 2-3 s of every alert -> Running and every Run click on this
2-core machine. `runbooks serve` hands the runner the flow objects instead (``Runner.add_flow``), so a run
starts through Prefect's ``run_flow_in_subprocess`` with the flow pickled, and two things are changed
there:

- **The start method is forkserver, not spawn.** One helper process imports Prefect's engine and the
  served flow modules once, when serving starts, and each run is a fork of it. Everything else is
  Prefect's own code path: the same pickled call, environment, control channel and process handle (the
  runner still signals the run by its pid and reads its exit code). The helper is single-threaded when it
  forks (tests/test_forkserver.py checks), so a child inherits no half-held lock. A flow module changed on
  disk is picked up when `runbooks serve` restarts, as the deployments it registered are.
- **A served flow is pickled by reference** (its module and attribute name). cloudpickle would pickle the
  function by value, since the module attribute holds the Flow, not the function, and a function pickled
  by value keeps only the globals its code uses: under ``from __future__ import annotations`` its
  parameter annotations (``Annotated[...]``) then no longer resolve and Prefect's parameter validation
  fails. By reference, the run gets the module's own Flow object (already imported in the forkserver).

Both are installed only for the Prefect version they were checked against, where the engine still has
what they use; otherwise Prefect's own behaviour stays. ``--start-method spawn`` keeps Prefect's spawn.
"""

from __future__ import annotations

import copyreg
import importlib
import logging
import multiprocessing
import multiprocessing.context
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("runbooks.serve")

CHECKED_VERSIONS = ("3.8.8",)
ENGINE_MODULES = ("prefect.flow_engine", "prefect.runner")


class _StartMethodShim:
    """Stands in for the ``multiprocessing`` module inside ``prefect.flow_engine``: its ``get_context("spawn")``
    (the one call ``run_flow_in_subprocess`` makes) answers the forkserver context; any other name, attribute
    or method is the real module's."""

    def __init__(self, context: multiprocessing.context.BaseContext) -> None:
        self._context = context

    def get_context(self, method: str | None = None) -> Any:
        return self._context if method == "spawn" else multiprocessing.get_context(method)

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)


def applicable() -> bool:
    """The pinned Prefect, with the engine function and the module reference this replaces."""
    import prefect
    import prefect.flow_engine as engine

    return (prefect.__version__ in CHECKED_VERSIONS and hasattr(engine, "run_flow_in_subprocess")
            and isinstance(getattr(engine, "multiprocessing", None), type(multiprocessing) | _StartMethodShim)
            and "forkserver" in multiprocessing.get_all_start_methods())


def install(flow_modules: Sequence[str]) -> bool:
    """Start the forkserver (it imports Prefect's engine and ``flow_modules`` in the background) and have
    ``run_flow_in_subprocess`` use it; False, and nothing changed, where that does not apply."""
    if not applicable():
        return False
    from multiprocessing import forkserver

    import prefect.flow_engine as engine

    context = multiprocessing.get_context("forkserver")
    preload = list(dict.fromkeys([*ENGINE_MODULES, *flow_modules]))
    context.set_forkserver_preload(preload)
    forkserver.ensure_running()  # now, so the first run does not wait for the imports
    engine.multiprocessing = _StartMethodShim(context)
    log.info("flow runs fork from a forkserver with %s imported", ", ".join(preload))
    return True


def installed() -> bool:
    import prefect.flow_engine as engine

    return isinstance(getattr(engine, "multiprocessing", None), _StartMethodShim)


# -- flows pickled by reference ------------------------------------------------------------------------------


def _module_flow(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def _attribute_name(flow: Any) -> str | None:
    """The name under which ``flow`` itself is an attribute of its function's module, if it is one."""
    module = sys.modules.get(flow.fn.__module__)
    if module is None or module.__name__ == "__main__":
        return None
    return next((name for name, value in vars(module).items() if value is flow), None)


def _reduce_flow(flow: Any) -> Any:
    name = _attribute_name(flow)
    if name is None:  # a copy (with_options) or a flow defined elsewhere: Prefect's own pickling
        return flow.__reduce_ex__(4)
    return _module_flow, (flow.fn.__module__, name)


def pickle_flows_by_reference() -> bool:
    """Module-level flows pickle as (module, name) in this process; False where not applicable."""
    import prefect
    from prefect import Flow

    if prefect.__version__ not in CHECKED_VERSIONS or {"__reduce__", "__reduce_ex__"} & set(vars(Flow)):
        return False
    copyreg.pickle(Flow, _reduce_flow)
    return True
