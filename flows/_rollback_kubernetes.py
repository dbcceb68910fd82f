"""The `rollback` runbook's Kubernetes targets: Deployments back to a revision or images (``kubernetes``), and a
Service switched to the other colour (``blue-green-kubernetes``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect.artifacts import create_table_artifact
from prefect.states import State

from blocks.errors import ConfigurationError, RunbookError
from blocks.kubernetes import KubernetesCluster
from flows._rollback_shared import Options, RollbackResult, approve_then_lock, flow_run_name, prove_healthy, report
from tasks.kubernetes import (
    DeploymentState,
    RollbackPlan,
    ServiceSwitchRefused,
    apply_pod_template,
    check_service_health,
    find_colour_deployment,
    fully_available,
    images_plan,
    parse_images,
    plan_revision_rollback,
    read_service,
    record_deployments,
    set_images,
    set_service_selector,
    wait_for_rollout,
)
from tasks.log import run_logger
from tasks.prometheus import CheckResult
from tasks.undo import UndoStack

ROLLED_BACK_FROM = "runbooks.prefect.io/rolled-back-from-revision"
ROLLED_BACK_BY = "runbooks.prefect.io/rolled-back-by"


def rollback_deployments(cluster: KubernetesCluster, ns: str, names: list[str], selector: str, to: str,
                         images: list[str] | None, opts: Options) -> RollbackResult | State:
    log = run_logger()
    wanted_images = parse_images(images) if images else None
    to_revision = _parse_to(to) if wanted_images is None else None
    if not names and not selector:
        raise ConfigurationError("give deployment, deployments or selector; nothing was changed")
    before = record_deployments(cluster, ns, names or None, selector or None)
    _table(before, None, "before")
    plans = _plans(cluster, before, to_revision, wanted_images)
    todo = [p for p in plans if not p.unchanged]
    if not todo:
        log.info("every deployment already runs the requested version; nothing to do")
        report("kubernetes", "nothing to do: already at the requested version", before, before, [], None, [])
        return RollbackResult(target="kubernetes", outcome="unchanged", changed=[], before=_rows(before),
                              after=_rows(before))
    states = {s.name: s for s in before}
    lines = ["| deployment | revision | now | rolls back to |", "|---|---|---|---|"]
    lines += [f"| `{p.target}` | {p.from_revision} -> {p.to_revision or 'new'} | "
              f"{states[p.name].image_list()} | {', '.join(f'{c}={i}' for c, i in p.images.items())} |"
              for p in todo]
    locked = approve_then_lock(opts, f"## Roll back {len(todo)} deployment(s) in `{ns}`?", lines,
                               todo[0].name if len(todo) == 1 else ns,
                               [f"{cluster.describe()}/deployment/{p.name}" for p in todo])
    if isinstance(locked, State):
        return locked
    run_name = flow_run_name()
    results: list[CheckResult] = []
    failure: BaseException | None = None
    undo = UndoStack()
    with locked:
        try:
            with undo:
                for plan in todo:
                    state = states[plan.name]
                    undo.register(f"put {state.target} back to revision {state.revision} ({state.image_list()})",
                                  _restore(cluster, state, opts))
                    marks = {ROLLED_BACK_FROM: str(state.revision), ROLLED_BACK_BY: run_name}
                    if wanted_images is not None:
                        set_images(cluster, ns, plan.name, {c: i for c, i in wanted_images.items()
                                                            if c in state.images}, annotations=marks)
                    else:
                        apply_pod_template(cluster, ns, plan.name, plan.template, {**plan.annotations, **marks})
                for plan in todo:
                    wait_for_rollout(cluster, ns, plan.name, timeout_seconds=opts.rollout_timeout,
                                     interval_seconds=opts.poll)
                prove_healthy(opts, results)
        except BaseException as exc:  # noqa: BLE001 - reported below, then re-raised
            failure = exc
        after = _record_after(cluster, ns, [s.name for s in before])
    outcome = ("rolled back and verified" if failure is None else
               f"FAILED ({failure}); " + ("the recorded state was put back" if undo.whole
                                          else "putting the recorded state back FAILED: act now"))
    _table(before, after, "after")
    report("kubernetes", outcome, before, after, results, undo, todo)
    if failure is not None:
        raise failure
    return RollbackResult(target="kubernetes", outcome="rolled back", changed=[p.target for p in todo],
                          before=_rows(before), after=_rows(after),
                          checks=[asdict(r) for r in results])


def _parse_to(to: str) -> int:
    text = to.strip().lower()
    if text == "previous":
        return 0
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ConfigurationError(f"to={to!r}: give 'previous' or a revision number (or images); nothing was changed")


def _plans(cluster: KubernetesCluster, before: list[DeploymentState], to_revision: int | None,
           wanted_images: dict[str, str] | None) -> list[RollbackPlan]:
    if wanted_images is not None:
        known = {c for s in before for c in s.images}
        unknown = sorted(set(wanted_images) - known)
        if unknown:
            raise ConfigurationError(f"no container named {unknown} in {[s.target for s in before]} (containers: "
                                     f"{sorted(known)}); nothing was changed")
        return [images_plan(s, {c: i for c, i in wanted_images.items() if c in s.images}) for s in before]
    plans = []
    for state in before:
        plan = plan_revision_rollback(cluster, state, to_revision or 0)
        rolled_back_from = state.annotations.get(ROLLED_BACK_FROM)
        if to_revision == 0 and rolled_back_from and str(plan.to_revision) == rolled_back_from:
            raise ConfigurationError(
                f"{state.target} was rolled back from revision {rolled_back_from} by "
                f"{state.annotations.get(ROLLED_BACK_BY, 'an earlier run')}; 'previous' would deploy that revision "
                "again (a flap). Give an explicit revision or images; nothing was changed")
        plans.append(plan)
    return plans


def _restore(cluster: KubernetesCluster, state: DeploymentState, opts: Options):  # noqa: ANN202
    def undo() -> None:
        apply_pod_template(cluster, state.namespace, state.name, state.template, state.annotations)
        wait_for_rollout(cluster, state.namespace, state.name, timeout_seconds=opts.rollout_timeout,
                         interval_seconds=opts.poll)
    return undo


def _record_after(cluster: KubernetesCluster, ns: str, names: list[str]) -> list[DeploymentState]:
    try:
        return record_deployments(cluster, ns, names)
    except Exception as exc:  # noqa: BLE001 - the report is written even when the API is gone
        run_logger().error("could not record the state after the run: %s", exc)
        return []



# -- blue-green on Kubernetes -----------------------------------------------------------------------------------


def switch_colour(cluster: KubernetesCluster, ns: str, service: str, label: str, colours: list[str],
                  colour_service: str, health_path: str, opts: Options) -> RollbackResult | State:
    svc = read_service(cluster, ns, service)
    current = svc.selector.get(label)
    if current not in colours:
        raise ConfigurationError(f"service {ns}/{service} selects {svc.selector}: its {label!r} is not one of "
                                 f"{colours}; nothing was changed")
    other = colours[1] if current == colours[0] else colours[0]
    wanted = {**svc.selector, label: other}
    evidence: list[str] = [f"service `{ns}/{service}` selects `{svc.selector}` (active colour {current})"]
    try:
        active = [find_colour_deployment(cluster, ns, svc.selector)]
    except ServiceSwitchRefused as exc:  # the active colour may be gone: that is no reason not to switch
        active = []
        evidence.append(f"{current}: {exc}")
    try:
        standby = find_colour_deployment(cluster, ns, wanted)
        why = fully_available(standby)
        if why:
            raise ServiceSwitchRefused(f"{why}; service {ns}/{service} still selects {current}, nothing was switched")
        evidence.append(f"{other}: `{standby.target}` {standby.available}/{standby.replicas} available, "
                        f"{standby.image_list()}")
        own = colour_service.format(service=service, colour=other)
        own_svc = read_service(cluster, ns, own)
        health = check_service_health(cluster, ns, own, own_svc.ports[0] if own_svc.ports else None, health_path,
                                      interval_seconds=min(opts.poll, 1))
        evidence.append(f"{other} health through `{ns}/{own}{health_path}` (API proxy): HTTP {health.status}")
        if not health.healthy:
            raise ServiceSwitchRefused(f"{other} ({standby.target}) is unhealthy through service {ns}/{own}"
                                       f"{health_path}: HTTP {health.status} after {health.attempts} checks; "
                                       f"service {ns}/{service} still selects {current}, nothing was switched")
    except RunbookError as exc:
        _selector_table(ns, service, svc.selector, svc.selector, active, [])
        report("blue-green-kubernetes", f"REFUSED: {exc}", [], [], [], None, [], evidence)
        raise
    locked = approve_then_lock(opts, f"## Switch `{ns}/{service}` from {current} to {other}?",
                               [f"- {line}" for line in evidence], service, [f"{cluster.describe()}/service/{service}"])
    if isinstance(locked, State):
        return locked
    results: list[CheckResult] = []
    failure: BaseException | None = None
    undo = UndoStack()
    with locked:
        try:
            with undo:
                undo.register(f"point {ns}/{service} back at {current}",
                              lambda: set_service_selector(cluster, ns, service, svc.selector))
                set_service_selector(cluster, ns, service, wanted)
                evidence.append(f"service `{ns}/{service}` switched to `{wanted}`")
                prove_healthy(opts, results)
        except BaseException as exc:  # noqa: BLE001 - reported below, then re-raised
            failure = exc
    final = read_service(cluster, ns, service)
    evidence.append(f"service `{ns}/{service}` now selects `{final.selector}`")
    outcome = (f"switched {current} -> {other} and verified" if failure is None else
               f"FAILED ({failure}); " + (f"switched back to {current}" if undo.whole
                                          else "switching back FAILED: act now"))
    _selector_table(ns, service, svc.selector, final.selector, active, [standby])
    report("blue-green-kubernetes", outcome, [], [], results, undo, [], evidence)
    if failure is not None:
        raise failure
    return RollbackResult(target="blue-green-kubernetes", outcome=f"switched to {other}", changed=[f"{ns}/{service}"],
                          before=[{"service": service, "selector": svc.selector}],
                          after=[{"service": service, "selector": final.selector}],
                          checks=[asdict(r) for r in results])


def _selector_table(ns: str, service: str, before: dict[str, str], after: dict[str, str],
                    active: list[DeploymentState], standby: list[DeploymentState]) -> None:
    rows: list[dict[str, Any]] = [{"what": f"service {ns}/{service} selector", "before": str(before),
                                   "after": str(after)}]
    rows += [{"what": f"deployment {s.target}", "before": f"{s.image_list()} ({s.available}/{s.replicas})",
              "after": "serving" if all((s.template.get("metadata", {}).get("labels") or {}).get(k) == v
                                        for k, v in after.items()) else "standby"} for s in [*active, *standby]]
    create_table_artifact(rows, key="rollback-after", description="Blue-green switch before and after")


def _rows(states: list[DeploymentState]) -> list[dict[str, Any]]:
    return [{"deployment": s.target, "revision": s.revision, "images": s.image_list(),
             "replicas": s.replicas, "available": s.available} for s in states]


def _table(before: list[DeploymentState], after: list[DeploymentState] | None, when: str) -> None:
    after_by = {s.name: s for s in after or []}
    rows = []
    for s in before:
        row: dict[str, Any] = {"deployment": s.target, "revision before": s.revision, "images before": s.image_list(),
                               "replicas before": f"{s.available}/{s.replicas}"}
        if after is not None:
            a = after_by.get(s.name)
            row.update({"revision after": a.revision if a else "?", "images after": a.image_list() if a else "?",
                        "replicas after": f"{a.available}/{a.replicas}" if a else "?"})
        rows.append(row)
    create_table_artifact(rows, key=f"rollback-{when}", description=f"Deployments {when} the rollback")

