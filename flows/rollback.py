"""The `rollback` runbook: put a deployment back to a known version and prove it healthy.

Targets:
- ``kubernetes``: Deployments by name or label selector, to ``previous`` (what ``kubectl rollout undo``
  restores: the previous ReplicaSet's whole pod template), a revision number, or explicit images.
- ``blue-green-kubernetes``: switch a Service's colour selector to the other colour, only when that
  colour's Deployment exists, is fully available and healthy through its own Service (API server proxy).
- ``compose-ssh``: pin a compose service's version variables in the project's env file (written
  atomically) on a host over SSH, then ``docker compose pull`` + ``up -d --no-deps SERVICE``.
- ``blue-green-compose``: start the other colour's compose project (``app-blue``/``app-green``), and once it
  is healthy switch nginx's upstream file (written atomically, ``nginx -t``, ``nginx -s reload``) and the
  current-colour file; the old project keeps running.

Order: record the current state (artifact) and plan, checking everything that can be checked without a
change -> approval (unless confirm=True) -> the per-target lock -> each change with its undo registered
first -> wait for the rollout -> health through AppEndpoint -> optional Prometheus checks. Anything that
fails after the first change puts the recorded state back (once: the run never retries the rollback and
never flaps), and the before/after table and the report are written whatever happened.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.context import get_run_context
from prefect.states import Cancelled, State
from pydantic import BaseModel, Field

from blocks.app import AppEndpoint
from blocks.errors import ConfigurationError, RunbookError
from blocks.kubernetes import KubernetesCluster
from blocks.prometheus import PrometheusAPI
from blocks.ssh import SSHHost
from flows._form import DANGER, param
from tasks.app import wait_until_healthy
from tasks.approval import ask_approval, refused_at_start
from tasks.compose import (
    ComposeProject,
    ContainerState,
    check_variables,
    compose_ps,
    env_values,
    pull_and_up,
    reload_nginx,
    set_env_lines,
    stop_project,
    wait_compose_healthy,
)
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
from tasks.locks import ensure_lock, lock_name
from tasks.log import run_logger
from tasks.metrics import push_flow_run_metrics
from tasks.notify import notify_hook
from tasks.prometheus import CheckResult, MetricCheck, MetricCheckFailed, check_metric, query_instant
from tasks.ssh import read_remote_file, write_remote_file
from tasks.undo import UndoStack

Target = Literal["kubernetes", "blue-green-kubernetes", "compose-ssh", "blue-green-compose"]
ROLLED_BACK_FROM = "runbooks.prefect.io/rolled-back-from-revision"
ROLLED_BACK_BY = "runbooks.prefect.io/rolled-back-by"


class RollbackResult(BaseModel):
    target: str
    outcome: str
    changed: list[str]
    before: list[dict[str, Any]]
    after: list[dict[str, Any]]
    checks: list[dict[str, Any]] = Field(default_factory=list)


@flow(name="rollback", on_completion=[notify_hook("completed"), push_flow_run_metrics],
      on_failure=[notify_hook("FAILED"), push_flow_run_metrics],
      on_crashed=[notify_hook("CRASHED"), push_flow_run_metrics],
      on_cancellation=[notify_hook("cancelled")])
def rollback(
    target: Annotated[Target, param(
        "What to roll back", "kubernetes (default): Deployments back to a revision or images. "
        "blue-green-kubernetes: switch a Service to the other colour. compose-ssh: pin a compose service's "
        "version over SSH. blue-green-compose: start the other colour's project, switch nginx to it.")
    ] = "kubernetes",
    deployment: Annotated[str, param(
        "Deployment", "kubernetes: a Deployment name (what an alert's label gives). Empty: use deployments "
        "or selector.")] = "",
    namespace: Annotated[str, param(
        "Namespace", "Empty (default): the cluster Block's namespace.")] = "",
    to: Annotated[str, param(
        "Roll back to", "kubernetes: previous (default; as kubectl rollout undo) or a revision number.")
    ] = "previous",
    reason: Annotated[str, param(
        "Reason", "Why (an alert's summary); shown in the approval form and the report. Empty by "
        "default.")] = "",
    confirm: Annotated[bool, param(
        DANGER + "skip the approval", "Change production without pausing for approval in the UI. Off by "
        "default: the run pauses and shows the exact plan.")] = False,
    cluster: Annotated[KubernetesCluster | None, param(
        "Kubernetes cluster", "kubernetes targets: the cluster. Empty: required for kubernetes targets, "
        "unused for compose.")] = None,
    app: Annotated[AppEndpoint | None, param(
        "Application", "Health-checked after the change; a failed check puts the recorded state back. "
        "Empty: no health check.")] = None,
    prometheus: Annotated[PrometheusAPI | None, param(
        "Prometheus", "Evaluates the checks below after the change. Empty: no metric checks.")] = None,
    checks: Annotated[list[MetricCheck] | None, param(
        "Metric checks", "Each must stay <= max for for_seconds after the change, else it is put back. "
        "Empty: none.")] = None,
    deployments: Annotated[list[str] | None, param(
        "More Deployments", "kubernetes: more Deployment names. Empty: none.")] = None,
    selector: Annotated[str, param(
        "Label selector", "kubernetes: a label selector of the Deployments, e.g. app=shop. Empty: "
        "none.")] = "",
    images: Annotated[list[str] | None, param(
        "Images", "kubernetes: explicit images instead of 'Roll back to': CONTAINER=IMAGE, e.g. "
        "api=registry/app:v1.1.0. Empty: use the revision.")] = None,
    service: Annotated[str, param(
        "Service", "blue-green-kubernetes: the Service whose selector picks the active colour.")] = "",
    colour_label: Annotated[str, param(
        "Colour label", "blue-green: the selector label that holds the colour. version by default.")
    ] = "version",
    colours: Annotated[list[str], param(
        "Colours", "blue-green: the two colours. [blue, green] by default.", min_length=2, max_length=2)
    ] = ["blue", "green"],  # noqa: B006
    colour_service: Annotated[str, param(
        "Colour Service", "blue-green-kubernetes: each colour's own Service, checked through the API server "
        "proxy before the switch; {service} and {colour} are filled in. {service}-{colour} by default.")
    ] = "{service}-{colour}",
    colour_health_path: Annotated[str, param(
        "Colour health path", "blue-green: the HTTP path checked on the other colour before the switch. "
        "/health by default.")] = "/health",
    ssh: Annotated[SSHHost | None, param(
        "SSH host", "compose targets: the host (known_hosts checked). Empty: required for compose "
        "targets.")] = None,
    compose_dir: Annotated[str, param(
        "Compose directory", "compose targets: the project directory on the host.")] = "",
    compose_project: Annotated[str, param(
        "Compose project", "compose-ssh: the project name (-p; empty: the directory's name, as compose "
        "does); blue-green-compose: a pattern with {colour} (empty: app-{colour}).")] = "",
    compose_env_file: Annotated[str, param(
        "Compose env file", "The env file compose reads, relative to the compose directory. .env by "
        "default.")] = ".env",
    compose_service: Annotated[str, param(
        "Compose service", "compose-ssh: the service to recreate.")] = "",
    variables: Annotated[dict[str, str] | None, param(
        "Version variables", "compose-ssh: version variables to pin in the env file, e.g. {API_VERSION: "
        "v1.1.0}.")] = None,
    colour_file: Annotated[str, param(
        "Colour file", "blue-green-compose: the file that names the live colour (the guides' "
        "current_env).")] = "",
    upstream_file: Annotated[str, param(
        "nginx upstream file", "blue-green-compose: the nginx file that points at a colour.")] = "",
    upstream_configs: Annotated[dict[str, str] | None, param(
        "Upstream per colour", "blue-green-compose: the upstream file's content for each colour.")] = None,
    nginx: Annotated[list[str], param(
        "nginx command", "How nginx is called on the host (argv); -t and -s reload are appended. [nginx] by "
        "default.")] = ["nginx"],  # noqa: B006
    approval_timeout_seconds: Annotated[int, param(
        "Approval timeout (s)", "Without an answer in this time the run ends Cancelled; nothing is changed. "
        "3600 by default.", ge=10)] = 3600,
    rollout_timeout_seconds: Annotated[float, param(
        "Rollout timeout (s)", "How long the rollout may take before the recorded state is put back. 600 by "
        "default.", gt=0)] = 600,
    health_timeout_seconds: Annotated[float, param(
        "Health timeout (s)", "How long the application may take to be healthy after the change. 120 by "
        "default.", gt=0)] = 120,
    poll_seconds: Annotated[float, param(
        "Poll interval (s)", "Seconds between rollout status checks. 2 by default.", gt=0)] = 2,
    check_interval_seconds: Annotated[float, param(
        "Check interval (s)", "Seconds between metric check evaluations. 5 by default.", gt=0)] = 5,
    lock_timeout_seconds: Annotated[float, param(
        "Lock wait (s)", "Wait this long for another rollback of the same target, then fail. 600 by "
        "default.", ge=0)] = 600,
    notify_block: Annotated[str | None, param(
        "Notify", "A saved notification Block (e.g. slack-webhook/ops) told of success and failure. Empty: "
        "nobody is told.")] = None,
) -> RollbackResult | State:
    """Roll a deployment back to a known version, verified by its rollout, its health and its metrics."""
    if (refused := refused_at_start()) is not None:  # an alert's approval form said reject
        return refused
    if checks and prometheus is None:
        raise ConfigurationError("checks need the prometheus Block; nothing was changed")
    options = _Options(app, prometheus, checks or [], confirm, reason, rollout_timeout_seconds, poll_seconds,
                       health_timeout_seconds, check_interval_seconds, approval_timeout_seconds, lock_timeout_seconds)
    if target in ("compose-ssh", "blue-green-compose"):
        if ssh is None or not compose_dir:
            raise ConfigurationError(f"target {target} needs the ssh Block and compose_dir; nothing was changed")
        if target == "compose-ssh":
            if not compose_service or not variables:
                raise ConfigurationError("compose-ssh needs compose_service and variables; nothing was changed")
            name = compose_project or compose_dir.rstrip("/").rsplit("/", 1)[-1]
            if "{" in name:
                raise ConfigurationError(f"compose_project {name!r}: a project name, not a pattern, for compose-ssh")
            project = ComposeProject(compose_dir, name, compose_env_file)
            return _pin_compose(ssh, project, compose_service, variables, options)
        if not colour_file or not upstream_file or not upstream_configs or set(upstream_configs) != set(colours):
            raise ConfigurationError(f"blue-green-compose needs colour_file, upstream_file and upstream_configs for "
                                     f"each of {colours}; nothing was changed")
        return _switch_compose(ssh, compose_dir, compose_project or "app-{colour}", compose_env_file, colours,
                               colour_file,
                               upstream_file, upstream_configs, nginx, options)
    if cluster is None:
        raise ConfigurationError(f"target {target} needs the cluster Block; nothing was changed")
    ns = namespace or cluster.namespace
    if target == "kubernetes":
        names = [n for n in [deployment, *(deployments or [])] if n]
        return _rollback_deployments(cluster, ns, names, selector, to, images, options)
    if not service:
        raise ConfigurationError("blue-green-kubernetes needs the service; nothing was changed")
    return _switch_colour(cluster, ns, service, colour_label, colours, colour_service, colour_health_path, options)


@dataclass(frozen=True)
class _Options:
    """What every target shares: proof, approval, lock, timings."""

    app: AppEndpoint | None
    prometheus: PrometheusAPI | None
    checks: list[MetricCheck]
    confirm: bool
    reason: str
    rollout_timeout: float
    poll: float
    health_timeout: float
    check_interval: float
    approval_timeout: int
    lock_timeout: float


# -- kubernetes ------------------------------------------------------------------------------------------------


def _rollback_deployments(cluster: KubernetesCluster, ns: str, names: list[str], selector: str, to: str,
                          images: list[str] | None, opts: _Options) -> RollbackResult | State:
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
        _report("kubernetes", "nothing to do: already at the requested version", before, before, [], None, [])
        return RollbackResult(target="kubernetes", outcome="unchanged", changed=[], before=_rows(before),
                              after=_rows(before))
    states = {s.name: s for s in before}
    if not opts.confirm:
        lines = ["| deployment | revision | now | rolls back to |", "|---|---|---|---|"]
        lines += [f"| `{p.target}` | {p.from_revision} -> {p.to_revision or 'new'} | "
                  f"{states[p.name].image_list()} | {', '.join(f'{c}={i}' for c, i in p.images.items())} |"
                  for p in todo]
        answer = _ask_approval(f"## Roll back {len(todo)} deployment(s) in `{ns}`?", lines, opts,
                               todo[0].name if len(todo) == 1 else ns)
        if answer is not None:
            return answer

    run_name = _run_name()
    locks = [lock_name("rollback", f"{cluster.describe()}/deployment/{p.name}") for p in todo]
    results: list[CheckResult] = []
    failure: BaseException | None = None
    undo = UndoStack()
    with ExitStack() as stack:
        for name in locks:
            ensure_lock(name)
        stack.enter_context(concurrency(locks, occupy=1, timeout_seconds=opts.lock_timeout, strict=True))
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
                _prove_healthy(opts, results)
        except BaseException as exc:  # noqa: BLE001 - reported below, then re-raised
            failure = exc
        after = _record_after(cluster, ns, [s.name for s in before])
    outcome = ("rolled back and verified" if failure is None else
               f"FAILED ({failure}); " + ("the recorded state was put back" if undo.whole
                                          else "putting the recorded state back FAILED: act now"))
    _table(before, after, "after")
    _report("kubernetes", outcome, before, after, results, undo, todo)
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


def _restore(cluster: KubernetesCluster, state: DeploymentState, opts: _Options):  # noqa: ANN202
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


def _switch_colour(cluster: KubernetesCluster, ns: str, service: str, label: str, colours: list[str],
                   colour_service: str, health_path: str, opts: _Options) -> RollbackResult | State:
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
        _report("blue-green-kubernetes", f"REFUSED: {exc}", [], [], [], None, [], evidence)
        raise
    if not opts.confirm:
        lines = [f"- {line}" for line in evidence]
        answer = _ask_approval(f"## Switch `{ns}/{service}` from {current} to {other}?", lines, opts, service)
        if answer is not None:
            return answer
    lock = lock_name("rollback", f"{cluster.describe()}/service/{service}")
    ensure_lock(lock)
    results: list[CheckResult] = []
    failure: BaseException | None = None
    undo = UndoStack()
    with concurrency(lock, occupy=1, timeout_seconds=opts.lock_timeout, strict=True):
        try:
            with undo:
                undo.register(f"point {ns}/{service} back at {current}",
                              lambda: set_service_selector(cluster, ns, service, svc.selector))
                set_service_selector(cluster, ns, service, wanted)
                evidence.append(f"service `{ns}/{service}` switched to `{wanted}`")
                _prove_healthy(opts, results)
        except BaseException as exc:  # noqa: BLE001 - reported below, then re-raised
            failure = exc
    final = read_service(cluster, ns, service)
    evidence.append(f"service `{ns}/{service}` now selects `{final.selector}`")
    outcome = (f"switched {current} -> {other} and verified" if failure is None else
               f"FAILED ({failure}); " + (f"switched back to {current}" if undo.whole
                                          else "switching back FAILED: act now"))
    _selector_table(ns, service, svc.selector, final.selector, active, [standby])
    _report("blue-green-kubernetes", outcome, [], [], results, undo, [], evidence)
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


# -- docker compose over SSH -------------------------------------------------------------------------------------


def _pin_compose(host: SSHHost, project: ComposeProject, service: str, variables: dict[str, str],
                 opts: _Options) -> RollbackResult | State:
    check_variables(variables)
    original = read_remote_file(host, project.env_path)
    if original is None:
        raise ConfigurationError(f"{host.describe()}: {project.env_path} does not exist; nothing was changed")
    names = list(variables)
    before_values = env_values(original, names)
    before_ps = compose_ps(host, project, [service])
    evidence = [f"host `{host.describe()}`, project `{project.name}` in `{project.directory}`",
                *[f"`{k}`: `{before_values[k]}` -> `{v}`" for k, v in variables.items()],
                "running: " + (_ps_line(before_ps) or "no container")]
    if all(before_values[k] == v for k, v in variables.items()) and before_ps and all(c.ready for c in before_ps):
        _report("compose-ssh", "nothing to do: already at the requested version", [], [], [], None, [], evidence)
        return RollbackResult(target="compose-ssh", outcome="unchanged", changed=[],
                              before=[{"variables": before_values}], after=[{"variables": before_values}])
    if not opts.confirm:
        answer = _ask_approval(f"## Roll back `{service}` of `{project.name}` on `{host.describe()}`?",
                               [f"- {e}" for e in evidence], opts, host.host)
        if answer is not None:
            return answer
    lock = lock_name("rollback", f"{host.host}:{host.port}/{project.directory}/{project.name}/{service}")
    ensure_lock(lock)
    results: list[CheckResult] = []
    failure: BaseException | None = None
    undo = UndoStack()

    def put_back() -> None:
        write_remote_file(host, project.env_path, original)
        pull_and_up(host, project, [service])
        wait_compose_healthy(host, project, [service], timeout_seconds=opts.rollout_timeout,
                             interval_seconds=opts.poll)

    with concurrency(lock, occupy=1, timeout_seconds=opts.lock_timeout, strict=True):
        try:
            with undo:
                undo.register(f"put {project.env_path} back and recreate {service}", put_back)
                write_remote_file(host, project.env_path, set_env_lines(original, variables))
                pull_and_up(host, project, [service])
                wait_compose_healthy(host, project, [service], timeout_seconds=opts.rollout_timeout,
                                     interval_seconds=opts.poll)
                _prove_healthy(opts, results)
        except BaseException as exc:  # noqa: BLE001 - reported below, then re-raised
            failure = exc
        after_ps = _safe_ps(host, project, [service])
    after_text = _safe_read(host, project.env_path)
    after_values = env_values(after_text, names) if after_text is not None else {}
    evidence.append("after: " + ", ".join(f"`{k}`=`{after_values.get(k)}`" for k in names)
                    + "; running: " + (_ps_line(after_ps) or "no container"))
    outcome = ("pinned and verified" if failure is None else
               f"FAILED ({failure}); " + ("the env file and service were put back" if undo.whole
                                          else "putting the env file back FAILED: act now"))
    _compose_table(names, before_values, after_values, before_ps, after_ps)
    _report("compose-ssh", outcome, [], [], results, undo, [], evidence)
    if failure is not None:
        raise failure
    return RollbackResult(target="compose-ssh", outcome="pinned", changed=[f"{project.name}/{service}"],
                          before=[{"variables": before_values, "containers": [asdict(c) for c in before_ps]}],
                          after=[{"variables": after_values, "containers": [asdict(c) for c in after_ps]}],
                          checks=[asdict(r) for r in results])


def _switch_compose(host: SSHHost, directory: str, pattern: str, env_file: str, colours: list[str],
                    colour_file: str, upstream_file: str, upstream_configs: dict[str, str], nginx: list[str],
                    opts: _Options) -> RollbackResult | State:
    if "{colour}" not in pattern:
        raise ConfigurationError(f"compose_project {pattern!r} must contain {{colour}} for blue-green-compose")
    text = read_remote_file(host, colour_file)
    current = (text or "").strip()
    if current not in colours:
        raise ConfigurationError(f"{host.describe()}: {colour_file} says {current!r}, not one of {colours}; "
                                 "nothing was changed")
    other = colours[1] if current == colours[0] else colours[0]
    old_upstream = read_remote_file(host, upstream_file)
    if old_upstream is None:
        raise ConfigurationError(f"{host.describe()}: {upstream_file} does not exist; nothing was changed")
    live, standby = (ComposeProject(directory, pattern.format(colour=c), env_file) for c in (current, other))
    live_ps = compose_ps(host, live)
    standby_ps = compose_ps(host, standby)
    evidence = [f"host `{host.describe()}`: `{colour_file}` says {current}",
                f"{current} (`{live.name}`): {_ps_line(live_ps) or 'no containers'}",
                f"{other} (`{standby.name}`): {_ps_line(standby_ps) or 'no containers'}"]
    if not opts.confirm:
        answer = _ask_approval(f"## Switch nginx on `{host.describe()}` from {current} to {other}?",
                               [f"- {e}" for e in evidence], opts, host.host)
        if answer is not None:
            return answer
    lock = lock_name("rollback", f"{host.host}:{host.port}/{upstream_file}")
    ensure_lock(lock)
    results: list[CheckResult] = []
    failure: BaseException | None = None
    undo = UndoStack()
    was_running = bool(standby_ps) and all(c.state == "running" for c in standby_ps)
    with concurrency(lock, occupy=1, timeout_seconds=opts.lock_timeout, strict=True):
        try:
            with undo:
                if not was_running:
                    undo.register(f"stop {standby.name} again", lambda: stop_project(host, standby))
                pull_and_up(host, standby)
                wait_compose_healthy(host, standby, timeout_seconds=opts.rollout_timeout, interval_seconds=opts.poll)
                evidence.append(f"{other} healthy: {_ps_line(compose_ps(host, standby))}")
                undo.register(f"put {upstream_file} back and reload nginx", lambda: (
                    write_remote_file(host, upstream_file, old_upstream), reload_nginx(host, nginx)))
                write_remote_file(host, upstream_file, upstream_configs[other])
                reload_nginx(host, nginx)
                undo.register(f"put {colour_file} back ({current})",
                              lambda: write_remote_file(host, colour_file, text or ""))
                write_remote_file(host, colour_file, f"{other}\n")
                evidence.append(f"nginx switched to {other}; {live.name} left running")
                _prove_healthy(opts, results)
        except BaseException as exc:  # noqa: BLE001 - reported below, then re-raised
            failure = exc
    outcome = (f"switched {current} -> {other} and verified" if failure is None else
               f"FAILED ({failure}); " + (f"nginx and {colour_file} put back to {current}" if undo.whole
                                          else "putting the switch back FAILED: act now"))
    final = _safe_read(host, colour_file)
    evidence.append(f"`{colour_file}` now says {(final or '?').strip()}")
    create_table_artifact([{"what": colour_file, "before": current, "after": (final or "?").strip()},
                           {"what": live.name, "before": _ps_line(live_ps), "after": _ps_line(_safe_ps(host, live))},
                           {"what": standby.name, "before": _ps_line(standby_ps),
                            "after": _ps_line(_safe_ps(host, standby))}],
                          key="rollback-after", description="Colours before and after the switch")
    _report("blue-green-compose", outcome, [], [], results, undo, [], evidence)
    if failure is not None:
        raise failure
    return RollbackResult(target="blue-green-compose", outcome=f"switched to {other}", changed=[upstream_file],
                          before=[{"colour": current}], after=[{"colour": other}],
                          checks=[asdict(r) for r in results])


def _ps_line(states: list[ContainerState]) -> str:
    return ", ".join(f"{c.service}={c.image} ({c.state}{'/' + c.health if c.health else ''})" for c in states)


def _safe_ps(host: SSHHost, project: ComposeProject, services: list[str] | None = None) -> list[ContainerState]:
    try:
        return compose_ps(host, project, services)
    except Exception as exc:  # noqa: BLE001 - the report is written even when the host is gone
        run_logger().error("could not read the containers of %s after the run: %s", project.name, exc)
        return []


def _safe_read(host: SSHHost, path: str) -> str | None:
    try:
        return read_remote_file(host, path)
    except Exception as exc:  # noqa: BLE001 - the report is written even when the host is gone
        run_logger().error("could not read %s after the run: %s", path, exc)
        return None


def _compose_table(names: list[str], before: dict[str, str | None], after: dict[str, str | None],
                   before_ps: list[ContainerState], after_ps: list[ContainerState]) -> None:
    rows = [{"what": k, "before": before.get(k), "after": after.get(k)} for k in names]
    rows.append({"what": "containers", "before": _ps_line(before_ps), "after": _ps_line(after_ps)})
    create_table_artifact(rows, key="rollback-after", description="Compose service before and after the rollback")


# -- shared steps -----------------------------------------------------------------------------------------------


def _prove_healthy(opts: _Options, results: list[CheckResult]) -> None:
    """Health through AppEndpoint, then every Prometheus check (each result appended to ``results``, the
    report's evidence); any failure raises (the undos run)."""
    if opts.app is not None:
        wait_until_healthy(opts.app, timeout_seconds=opts.health_timeout, interval_seconds=min(opts.poll, 2),
                           left_as="putting the recorded state back")
    for check in opts.checks:
        assert opts.prometheus is not None
        result = check_metric(opts.prometheus, check, interval_seconds=opts.check_interval)
        results.append(result)
        if not result.passed:
            raise MetricCheckFailed(f"check {result.name!r} failed: {result.detail}; measured "
                                    f"{[round(v, 6) for v in result.values]} (max {result.max:g})")


@task(cache_policy=NO_CACHE)
def current_metric_values(prometheus: PrometheusAPI, checks: list[MetricCheck]) -> list[tuple[str, list[float]]]:
    """One evaluation of each check's query, for the approval form (evidence, no pass/fail)."""
    with prometheus.get_client() as client:
        return [(c.name or c.query, query_instant(client, prometheus, c.query)) for c in checks]


def _ask_approval(title: str, lines: list[str], opts: _Options, name: str) -> State | None:
    """Pause for the operator, who types ``name`` (the target) to approve; returns a Cancelled state when
    rejected or timed out, else None (approved)."""
    log = run_logger()
    evidence = [f"- reason: {opts.reason}"] if opts.reason else []
    if opts.prometheus is not None and opts.checks:
        try:
            for metric, values in current_metric_values(opts.prometheus, opts.checks):
                evidence.append(f"- now: `{metric}` = {[round(v, 6) for v in values] or 'no data'}")
        except RunbookError as exc:
            evidence.append(f"- metrics unavailable: {exc}")
    description = "\n".join([title, "", *lines, "", *evidence, "",
                             "Every change has its undo registered first; a failed rollout, health check or metric "
                             "check puts the recorded state back.", "",
                             f"To approve, choose **approve** and type `{name}` (the target) in the form."])
    answer = ask_approval(description, name, opts.approval_timeout)
    if answer is None or not answer.approved:
        why = "timed out" if answer is None else f"rejected ({answer.note or 'no reason given'})"
        log.warning("rollback %s; nothing was changed", why)
        return Cancelled(message=f"approval {why}; nothing was changed")
    return None


def _run_name() -> str:
    try:
        return str(get_run_context().flow_run.name)  # type: ignore[union-attr]
    except (RuntimeError, AttributeError):
        return datetime.now(UTC).strftime("run-%Y%m%dT%H%M%SZ")


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


def _report(target: str, outcome: str, before: list[DeploymentState], after: list[DeploymentState],
            results: list[CheckResult], undo: UndoStack | None, plans: list[RollbackPlan],
            evidence: list[str] | None = None) -> None:
    after_by = {s.name: s for s in after}
    lines = [f"# Rollback ({target}): {outcome}", "", f"at {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC", ""]
    if before:
        lines += ["| deployment | before | after |", "|---|---|---|"]
        for s in before:
            a = after_by.get(s.name)
            lines.append(f"| `{s.target}` | rev {s.revision}: {s.image_list()} ({s.available}/{s.replicas}) | "
                         + (f"rev {a.revision}: {a.image_list()} ({a.available}/{a.replicas}) |" if a else "? |"))
        lines.append("")
    if plans:
        lines += ["Planned:", *[f"- `{p.target}`: revision {p.from_revision} -> "
                                f"{p.to_revision if p.to_revision is not None else 'explicit images'} "
                                f"({', '.join(f'{c}={i}' for c, i in p.images.items())})" for p in plans], ""]
    if evidence:
        lines += ["Evidence:", *[f"- {e}" for e in evidence], ""]
    if results:
        lines += ["| check | max | worst | values | result |", "|---|---|---|---|---|"]
        lines += [f"| `{r.name}` | {r.max:g} | {r.worst if r.worst is not None else '-'} | "
                  f"{[round(v, 6) for v in r.values]} | {'pass' if r.passed else 'FAIL: ' + r.detail} |"
                  for r in results]
        lines.append("")
    if undo is not None and undo.outcomes:
        lines += ["Undone:", *[f"- {o.step}: {'ok' if o.ok else 'FAILED: ' + o.error}" for o in undo.outcomes], ""]
    create_markdown_artifact("\n".join(lines), key="rollback-report")
    run_logger().info("rollback (%s): %s", target, outcome)
