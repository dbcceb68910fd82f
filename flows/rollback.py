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

The targets' steps are in flows/_rollback_kubernetes.py and flows/_rollback_compose.py; what they share (the
approval then the lock, the proof of health, the report) in flows/_rollback_shared.py.
"""

from __future__ import annotations

from typing import Annotated, Literal

from prefect import flow
from prefect.states import State

from blocks.app import AppEndpoint
from blocks.errors import ConfigurationError
from blocks.kubernetes import KubernetesCluster
from blocks.prometheus import PrometheusAPI
from blocks.ssh import SSHHost
from flows._form import DANGER, param
from flows._rollback_compose import pin_compose, switch_compose
from flows._rollback_kubernetes import rollback_deployments, switch_colour
from flows._rollback_shared import Options, RollbackResult
from tasks.approval import refused_at_start
from tasks.compose import ComposeProject
from tasks.metrics import push_flow_run_metrics
from tasks.notify import notify_hook
from tasks.prometheus import MetricCheck

Target = Literal["kubernetes", "blue-green-kubernetes", "compose-ssh", "blue-green-compose"]
__all__ = ["RollbackResult", "rollback"]


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
    options = Options(app, prometheus, checks or [], confirm, reason, rollout_timeout_seconds, poll_seconds,
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
            return pin_compose(ssh, project, compose_service, variables, options)
        if not colour_file or not upstream_file or not upstream_configs or set(upstream_configs) != set(colours):
            raise ConfigurationError(f"blue-green-compose needs colour_file, upstream_file and upstream_configs for "
                                     f"each of {colours}; nothing was changed")
        return switch_compose(ssh, compose_dir, compose_project or "app-{colour}", compose_env_file, colours,
                               colour_file,
                               upstream_file, upstream_configs, nginx, options)
    if cluster is None:
        raise ConfigurationError(f"target {target} needs the cluster Block; nothing was changed")
    ns = namespace or cluster.namespace
    if target == "kubernetes":
        names = [n for n in [deployment, *(deployments or [])] if n]
        return rollback_deployments(cluster, ns, names, selector, to, images, options)
    if not service:
        raise ConfigurationError("blue-green-kubernetes needs the service; nothing was changed")
    return switch_colour(cluster, ns, service, colour_label, colours, colour_service, colour_health_path, options)
